//! The QUIC listener's security: mutual TLS against the fleet CA, a revocation list by
//! gateway id, and the opening Hello/Welcome exchange that binds a connection to the
//! identity in its certificate.
//!
//! A gateway is refused at the TLS handshake when its certificate is missing, not issued by
//! the fleet CA, expired, not a client certificate, or names a revoked gateway id. Tenant and
//! gateway id then come from the verified certificate; the Hello's gateway id must match it.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use plantlink_wire::frame::{self, ErrorCode, ErrorFrame, Frame, Welcome};
use quinn::crypto::rustls::QuicServerConfig;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::pki::{self, GatewayIdentity};

/// Largest frame accepted during the handshake.
const MAX_HELLO: usize = 64 * 1024;

/// Why a QUIC listener could not be set up; names the file.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A PEM file is missing or unreadable.
    #[error("{path}: {why}")]
    Pem {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(String),
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, SetupError> {
    let pem = |why: String| SetupError::Pem {
        path: path.display().to_string(),
        why,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem("holds no certificate".into()));
    }
    Ok(certs)
}

/// A client verifier that also refuses revoked gateway ids.
#[derive(Debug)]
struct Revoking {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: HashSet<String>,
}

impl ClientCertVerifier for Revoking {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = pki::identity(end_entity.as_ref())
            .map_err(|e| rustls::Error::General(format!("not a gateway certificate: {e}")))?;
        if self.revoked.contains(&id.gateway) {
            tracing::warn!(gateway = %id.gateway, tenant = %id.tenant, "refused a revoked gateway");
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The QUIC server configuration: our certificate and key, gateways verified against the
/// fleet CA, and the revoked gateway ids refused.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
    revoked: &[String],
) -> Result<quinn::ServerConfig, SetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(client_ca)? {
        roots.add(c).map_err(|e| SetupError::Pem {
            path: client_ca.display().to_string(),
            why: e.to_string(),
        })?;
    }
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| SetupError::Tls(e.to_string()))?;
    let verifier = Arc::new(Revoking {
        inner,
        revoked: revoked.iter().cloned().collect(),
    });
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| SetupError::Pem {
        path: key.display().to_string(),
        why: e.to_string(),
    })?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| SetupError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert)?, key)
        .map_err(|e| SetupError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![frame::ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| SetupError::Tls(e.to_string()))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
}

/// Why a connection was not admitted after the TLS handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The peer presented no usable gateway certificate.
    #[error("no gateway identity: {0}")]
    Identity(String),
    /// The Hello never came or was malformed.
    #[error("hello: {0}")]
    Hello(String),
    /// The Hello named another gateway than the certificate.
    #[error("hello names gateway {claimed:?} but the certificate is {actual:?}; fix [gateway] id")]
    Mismatch {
        /// What the Hello said.
        claimed: String,
        /// What the certificate says.
        actual: String,
    },
}

/// Why [`read_frame`] returned no frame. The message is the transport's or the codec's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The stream or its connection ended: finished by the peer, reset, closed or lost. Not
    /// the peer's fault as far as the frames go; there is nothing more to read.
    #[error("{0}")]
    Ended(String),
    /// The bytes are not an acceptable frame: a bad length prefix or encoding, or larger
    /// than allowed.
    #[error("{0}")]
    Protocol(String),
}

impl ReadError {
    /// Whether the stream merely ended (as opposed to carrying a bad frame).
    pub fn is_end(&self) -> bool {
        matches!(self, Self::Ended(_))
    }
}

fn ended(e: quinn::ReadExactError) -> ReadError {
    ReadError::Ended(e.to_string())
}

/// Reads one frame from a QUIC stream.
pub async fn read_frame(recv: &mut quinn::RecvStream, max: usize) -> Result<Frame, ReadError> {
    let mut prefix = [0u8; frame::LENGTH_PREFIX];
    recv.read_exact(&mut prefix).await.map_err(ended)?;
    let total = frame::frame_len(&prefix, max).map_err(|e| ReadError::Protocol(e.to_string()))?;
    let mut buf = vec![0u8; total];
    buf[..frame::LENGTH_PREFIX].copy_from_slice(&prefix);
    recv.read_exact(&mut buf[frame::LENGTH_PREFIX..])
        .await
        .map_err(ended)?;
    frame::decode_frame(&buf, max)
        .map(|(f, _)| f)
        .map_err(|e| ReadError::Protocol(e.to_string()))
}

/// Writes one frame to a QUIC stream.
pub async fn write_frame(send: &mut quinn::SendStream, f: &Frame) -> Result<(), String> {
    let mut buf = Vec::new();
    frame::encode_frame(f, &mut buf);
    send.write_all(&buf).await.map_err(|e| e.to_string())
}

/// Admits an established connection: takes the identity from its certificate, reads the
/// agent's Hello on the first stream, and answers Welcome (or an Error frame).
pub async fn admit(
    conn: &quinn::Connection,
    max_batch_bytes: u32,
    max_in_flight: u32,
) -> Result<(GatewayIdentity, quinn::SendStream, quinn::RecvStream), HandshakeError> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| HandshakeError::Identity("no client certificate".into()))?;
    let first = certs
        .first()
        .ok_or_else(|| HandshakeError::Identity("empty certificate chain".into()))?;
    let id = pki::identity(first.as_ref()).map_err(|e| HandshakeError::Identity(e.to_string()))?;
    let (mut send, mut recv) = conn
        .accept_bi()
        .await
        .map_err(|e| HandshakeError::Hello(e.to_string()))?;
    let hello = match read_frame(&mut recv, MAX_HELLO)
        .await
        .map_err(|e| HandshakeError::Hello(e.to_string()))?
    {
        Frame::Hello(h) => h,
        other => {
            return Err(HandshakeError::Hello(format!(
                "expected Hello, got {other:?}"
            )));
        }
    };
    if hello.gateway_id != id.gateway {
        let reason = format!(
            "this certificate belongs to gateway {:?}, but the agent says it is {:?}; set [gateway] id = {:?}",
            id.gateway, hello.gateway_id, id.gateway
        );
        let _ = write_frame(
            &mut send,
            &Frame::Error(ErrorFrame {
                code: ErrorCode::FORBIDDEN,
                seq: None,
                reason,
            }),
        )
        .await;
        // Let the refusal reach the agent before the connection goes away.
        let _ = send.finish();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), conn.closed()).await;
        return Err(HandshakeError::Mismatch {
            claimed: hello.gateway_id,
            actual: id.gateway,
        });
    }
    let welcome = Frame::Welcome(Welcome {
        gateway_id: id.gateway.clone(),
        tenant: id.tenant.clone(),
        max_batch_bytes,
        max_in_flight,
    });
    write_frame(&mut send, &welcome)
        .await
        .map_err(HandshakeError::Hello)?;
    Ok((id, send, recv))
}
