//! The fleet PKI: one CA that signs the cloud's server certificate and every gateway's
//! client certificate.
//!
//! A gateway certificate carries its identity in a URI subject alternative name,
//! `urn:plantlink:tenant:<tenant>:gateway:<gateway-id>`, so the cloud takes tenant and gateway
//! from the verified certificate and never from what the gateway sends. Files are PEM:
//! `ca.pem`/`ca.key`, `server.pem`/`server.key`, `<gateway-id>.pem`/`<gateway-id>.key`.
//! Keys are ECDSA P-256 and written with mode 0600; nothing is ever overwritten.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// The URI prefix of a gateway identity.
pub const IDENTITY_PREFIX: &str = "urn:plantlink:tenant:";

/// A PKI error naming the file or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file would be overwritten.
    #[error(
        "{0} already exists; remove it first if you mean to replace it (certificates already issued from it stop working)"
    )]
    Exists(PathBuf),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The CA is missing or unreadable.
    #[error("fleet CA in {dir}: {why}; run `cloud-ingest pki init --dir {dir}` first")]
    NoCa {
        /// The PKI folder.
        dir: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// An id is not usable in a certificate or file name.
    #[error("{what} {value:?} must be 1 to 64 characters of letters, digits, '.', '_' or '-'")]
    BadId {
        /// Which id.
        what: &'static str,
        /// The value.
        value: String,
    },
    /// rcgen refused.
    #[error("certificate generation: {0}")]
    Cert(#[from] rcgen::Error),
    /// A certificate presented to the cloud is not a gateway certificate.
    #[error("certificate carries no gateway identity ({0})")]
    NoIdentity(String),
    /// A file is not a PEM certificate.
    #[error("{path}: not a PEM certificate ({why})")]
    NotCertificate {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The revocation list does not parse; nothing was written to it.
    #[error("revocation list {path}: {error}; fix that line first (nothing was written)")]
    BadList {
        /// The file.
        path: PathBuf,
        /// The line at fault.
        error: revocation::LineError,
    },
}

/// Who a gateway certificate says it is, and which certificate it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayIdentity {
    /// The tenant.
    pub tenant: String,
    /// The gateway id.
    pub gateway: String,
    /// The certificate's serial number: lowercase hex without leading zeros.
    pub serial: String,
    /// The SHA-256 fingerprint of the certificate (DER), lowercase hex.
    pub fingerprint: String,
}

fn check_id(what: &'static str, value: &str) -> Result<(), PkiError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !value.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadId {
            what,
            value: value.to_owned(),
        })
    }
}

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            PkiError::Exists(path.to_owned())
        } else {
            io(e)
        }
    })?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    // An hour of slack for clocks that are a little behind.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days);
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Plantlink");
    dn.push(DnType::CommonName, cn);
    dn
}

/// Creates the fleet CA in `dir` (created if missing), valid for `days`.
pub fn init(dir: &Path, days: i64) -> Result<PathBuf, PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(PkiError::Exists(p.clone()));
        }
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name("Plantlink fleet CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, days);
    let cert = params.self_signed(&key)?;
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    Ok(cert_path)
}

fn load_ca(dir: &Path) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let no_ca = |why: String| PkiError::NoCa {
        dir: dir.to_owned(),
        why,
    };
    let cert =
        std::fs::read_to_string(dir.join("ca.pem")).map_err(|e| no_ca(format!("ca.pem: {e}")))?;
    let key =
        std::fs::read_to_string(dir.join("ca.key")).map_err(|e| no_ca(format!("ca.key: {e}")))?;
    let key = KeyPair::from_pem(&key).map_err(|e| no_ca(format!("ca.key: {e}")))?;
    Issuer::from_ca_cert_pem(&cert, key).map_err(|e| no_ca(format!("ca.pem: {e}")))
}

fn issue(
    dir: &Path,
    stem: &str,
    params: CertificateParams,
    days: i64,
) -> Result<PathBuf, PkiError> {
    let now = OffsetDateTime::now_utc();
    issue_between(
        dir,
        stem,
        params,
        now - Duration::hours(1),
        now + Duration::days(days),
    )
}

fn issue_between(
    dir: &Path,
    stem: &str,
    mut params: CertificateParams,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<PathBuf, PkiError> {
    let (cert_path, key_path) = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(PkiError::Exists(p.clone()));
        }
    }
    let issuer = load_ca(dir)?;
    let key = KeyPair::generate()?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params.signed_by(&key, &issuer)?;
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    Ok(cert_path)
}

/// Issues the server certificate for the given DNS names and IP addresses.
pub fn server(dir: &Path, dns: &[String], ips: &[IpAddr], days: i64) -> Result<PathBuf, PkiError> {
    if dns.is_empty() && ips.is_empty() {
        return Err(PkiError::BadId {
            what: "--dns",
            value: String::new(),
        });
    }
    let mut params = CertificateParams::new(dns.to_vec())?;
    params
        .subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.distinguished_name = name(dns.first().map_or("plantlink cloud-ingest", String::as_str));
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    issue(dir, "server", params, days)
}

/// Issues a gateway's client certificate, carrying its id and tenant.
pub fn gateway(dir: &Path, gateway_id: &str, tenant: &str, days: i64) -> Result<PathBuf, PkiError> {
    let now = OffsetDateTime::now_utc();
    gateway_between(
        dir,
        gateway_id,
        tenant,
        now - Duration::hours(1),
        now + Duration::days(days),
    )
}

/// Issues a gateway certificate valid between two instants (tests use it for expired ones).
pub fn gateway_between(
    dir: &Path,
    gateway_id: &str,
    tenant: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<PathBuf, PkiError> {
    check_id("gateway id", gateway_id)?;
    check_id("tenant", tenant)?;
    if matches!(gateway_id, "ca" | "server") {
        return Err(PkiError::BadId {
            what: "gateway id (reserved name)",
            value: gateway_id.to_owned(),
        });
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = name(gateway_id);
    let uri = format!("{IDENTITY_PREFIX}{tenant}:gateway:{gateway_id}");
    params.subject_alt_names = vec![SanType::URI(uri.try_into()?)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    issue_between(dir, gateway_id, params, not_before, not_after)
}

/// The serial number (lowercase hex, no leading zeros) and SHA-256 fingerprint of a
/// certificate.
pub fn serial_and_fingerprint(cert_der: &[u8]) -> Result<(String, String), PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| PkiError::NoIdentity(format!("not X.509: {e}")))?;
    Ok((
        revocation::serial_hex(cert.raw_serial()),
        revocation::sha256_hex(cert_der),
    ))
}

/// The first certificate of a PEM file, in DER.
pub fn read_certificate(path: &Path) -> Result<Vec<u8>, PkiError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let bad = |why: String| PkiError::NotCertificate {
        path: path.to_owned(),
        why,
    };
    let mut certs = CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))?;
    match certs.next() {
        Some(Ok(c)) => Ok(c.to_vec()),
        Some(Err(e)) => Err(bad(e.to_string())),
        None => Err(bad("holds no CERTIFICATE block".into())),
    }
}

/// The gateway identity in a (verified) certificate, with its serial and fingerprint.
pub fn identity(cert_der: &[u8]) -> Result<GatewayIdentity, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| PkiError::NoIdentity(format!("not X.509: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::NoIdentity(e.to_string()))?
        .ok_or_else(|| PkiError::NoIdentity("no subject alternative name".into()))?;
    for n in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::URI(uri) = n
            && let Some(rest) = uri.strip_prefix(IDENTITY_PREFIX)
            && let Some((tenant, gateway)) = rest.split_once(":gateway:")
        {
            check_id("tenant", tenant)?;
            check_id("gateway id", gateway)?;
            return Ok(GatewayIdentity {
                tenant: tenant.to_owned(),
                gateway: gateway.to_owned(),
                serial: revocation::serial_hex(cert.raw_serial()),
                fingerprint: revocation::sha256_hex(cert_der),
            });
        }
    }
    Err(PkiError::NoIdentity(format!("no {IDENTITY_PREFIX}... URI")))
}

pub mod revocation;

#[cfg(test)]
mod tests;
