//! The QUIC listener's security: mutual TLS against the fleet CA, a revocation list that can
//! be reloaded while running, the opening Hello/Welcome exchange that binds a connection to
//! the identity in its certificate, and the registry of live connections (one per gateway).
//!
//! A gateway is refused at the TLS handshake when its certificate is missing, not issued by
//! the fleet CA, expired, not a client certificate, or revoked: by serial, by fingerprint or
//! by gateway id ([`RevocationList`]). Tenant and gateway id then come from the verified
//! certificate; the Hello's gateway id must match it.
//!
//! A gateway holds at most one connection: [`Live::register`] closes the older one
//! ([`CLOSE_REPLACED`]). [`Reloader::reload`] (SIGHUP, or the file changing) reads the list
//! again and closes the live connections it now revokes ([`CLOSE_REVOKED`]); a list that
//! does not parse leaves the previous one in force.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use metrics::{counter, gauge};
use plantlink_wire::frame::{self, ErrorCode, ErrorFrame, Frame, Welcome};
use quinn::VarInt;
use quinn::crypto::rustls::QuicServerConfig;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::pki::revocation::{Entry, LoadError, Match, RevocationList};
use crate::pki::{self, GatewayIdentity};

/// QUIC application close code: the connection was not admitted (bad Hello).
pub const CLOSE_NOT_ADMITTED: u32 = 1;
/// QUIC application close code: a newer connection of the same gateway replaced this one.
pub const CLOSE_REPLACED: u32 = 2;
/// QUIC application close code: the certificate was revoked while connected.
pub const CLOSE_REVOKED: u32 = 3;
/// The close reason with [`CLOSE_REPLACED`].
pub const REPLACED_REASON: &str = "replaced by a newer connection of this gateway";

/// Bidirectional streams a gateway may have open at once: the agent opens one control
/// stream and one per lane (two), plus a margin for a stream being replaced.
pub const MAX_BIDI_STREAMS: u32 = 4;
/// A connection that carries no packet for this long is dropped. The agent reports its
/// queue every 5 s on the control stream, and the cloud's keep-alives ([`KEEP_ALIVE`])
/// make a live but quiet agent answer, so only a gone one reaches it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the cloud pings a connection that has sent nothing.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);

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

/// When the revocation file last looked like, to notice it changing.
type Stamp = Option<(Option<std::time::SystemTime>, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let ino = 0;
    Some((m.modified().ok(), m.len(), ino))
}

#[derive(Debug)]
struct RevocationState {
    /// `quic.revocation_file`, read again on [`Revocations::reload`].
    file: Option<PathBuf>,
    /// `quic.revoked` (gateway ids), fixed at start.
    fixed: RevocationList,
    current: RwLock<Arc<RevocationList>>,
    /// The file as it was at the last (attempted) load.
    seen: Mutex<Stamp>,
}

/// The revocation list in force, shared by the TLS verifier and the reloader.
#[derive(Debug, Clone)]
pub struct Revocations(Arc<RevocationState>);

impl Revocations {
    /// A list that never changes (tests, and a config without `quic.revocation_file`).
    pub fn fixed(list: RevocationList) -> Self {
        Self(Arc::new(RevocationState {
            file: None,
            fixed: list.clone(),
            current: RwLock::new(Arc::new(list)),
            seen: Mutex::new(None),
        }))
    }

    /// The entries of `quic.revoked` (gateway ids, or `serial:`/`sha256:`/`gateway:`
    /// entries) and of the file, read now. Errors name the key or the file's line.
    pub fn load(file: Option<&Path>, revoked: &[String]) -> anyhow::Result<Self> {
        let mut fixed = RevocationList::default();
        for r in revoked {
            let entry = if r.contains(':') {
                Entry::parse(r)
            } else {
                Entry::gateway(r)
            };
            fixed.insert(entry.map_err(|e| anyhow::anyhow!("quic.revoked entry {r:?}: {e}"))?);
        }
        let this = Self(Arc::new(RevocationState {
            file: file.map(Path::to_owned),
            fixed: fixed.clone(),
            current: RwLock::new(Arc::new(fixed)),
            seen: Mutex::new(None),
        }));
        if file.is_some() {
            this.reload()?;
        }
        Ok(this)
    }

    /// The list in force.
    pub fn current(&self) -> Arc<RevocationList> {
        self.0
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The file the list is read from, if any.
    pub fn file(&self) -> Option<&Path> {
        self.0.file.as_deref()
    }

    /// Reads the file again and puts it in force (with `quic.revoked`). On an error the
    /// list in force stays.
    pub fn reload(&self) -> Result<Arc<RevocationList>, LoadError> {
        let Some(file) = &self.0.file else {
            return Ok(self.current());
        };
        *self.0.seen.lock().unwrap_or_else(PoisonError::into_inner) = stamp(file);
        let mut list = RevocationList::load(file)?;
        list.extend(&self.0.fixed);
        let list = Arc::new(list);
        *self
            .0
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = list.clone();
        Ok(list)
    }

    /// Whether the file changed (or appeared, or went) since it was last read.
    pub fn changed(&self) -> bool {
        let Some(file) = &self.0.file else {
            return false;
        };
        *self.0.seen.lock().unwrap_or_else(PoisonError::into_inner) != stamp(file)
    }
}

/// The connections admitted and still open, one per gateway id.
#[derive(Debug, Clone, Default)]
#[allow(clippy::type_complexity)]
pub struct Live(Arc<Mutex<HashMap<(String, String), (quinn::Connection, GatewayIdentity)>>>);

impl Live {
    /// Registers an admitted connection, closing the one of the same gateway it replaces
    /// (counted in `plantlink_cloud_connections_replaced_total`). Refuses a certificate that
    /// was revoked after its handshake.
    pub fn register(
        &self,
        conn: &quinn::Connection,
        id: &GatewayIdentity,
        revocations: &Revocations,
    ) -> Result<(), Match> {
        let mut live = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        // Under the registry's lock: a reload puts its list in force before it looks here.
        if let Some(m) = revocations.current().check(id) {
            counter!("plantlink_cloud_handshakes_revoked_total", "by" => m.label()).increment(1);
            return Err(m);
        }
        // Keyed by tenant and gateway: the same id in two tenants is two gateways.
        let key = (id.tenant.clone(), id.gateway.clone());
        if let Some((old, _)) = live.insert(key, (conn.clone(), id.clone())) {
            old.close(VarInt::from_u32(CLOSE_REPLACED), REPLACED_REASON.as_bytes());
            counter!("plantlink_cloud_connections_replaced_total").increment(1);
            tracing::warn!(
                gateway = %id.gateway, tenant = %id.tenant, old = %old.remote_address(),
                new = %conn.remote_address(),
                "a newer connection of this gateway replaced the open one (a gateway holds one connection)"
            );
        }
        Ok(())
    }

    /// Forgets a connection that ended, unless a newer one replaced it already.
    pub fn deregister(&self, conn: &quinn::Connection, tenant: &str, gateway: &str) {
        let mut live = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (tenant.to_owned(), gateway.to_owned());
        if live
            .get(&key)
            .is_some_and(|(c, _)| c.stable_id() == conn.stable_id())
        {
            live.remove(&key);
        }
    }

    /// Closes the connections whose certificates `list` revokes; returns them.
    pub fn close_revoked(&self, list: &RevocationList) -> Vec<(GatewayIdentity, Match)> {
        let mut live = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut closed = Vec::new();
        live.retain(|_, (conn, id)| match list.check(id) {
            Some(m) => {
                let reason = format!("certificate revoked (by {})", m.label());
                conn.close(VarInt::from_u32(CLOSE_REVOKED), reason.as_bytes());
                closed.push((id.clone(), m));
                false
            }
            None => true,
        });
        closed
    }

    /// How many gateways are connected.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether no gateway is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reloads the revocation list and closes what it revokes.
#[derive(Debug, Clone)]
pub struct Reloader {
    /// The list in force.
    pub revocations: Revocations,
    /// The live connections.
    pub live: Live,
}

impl Reloader {
    /// Reads the list again (`trigger` says why, for the log); on success closes the live
    /// connections it revokes and returns how many. On an error the previous list stays in
    /// force and the error (naming the file and line) is logged.
    pub fn reload(&self, trigger: &str) -> Result<usize, LoadError> {
        match self.revocations.reload() {
            Ok(list) => {
                counter!("plantlink_cloud_revocation_reloads_total", "result" => "ok").increment(1);
                gauge!("plantlink_cloud_revocation_entries").set(list.len() as f64);
                let closed = self.live.close_revoked(&list);
                for (id, m) in &closed {
                    tracing::warn!(
                        gateway = %id.gateway, tenant = %id.tenant, serial = %id.serial,
                        by = m.label(), "closed the connection of a revoked certificate"
                    );
                }
                counter!("plantlink_cloud_connections_revoked_total")
                    .increment(closed.len() as u64);
                tracing::info!(
                    trigger, file = ?self.revocations.file(), entries = list.len(),
                    closed = closed.len(), "revocation list reloaded"
                );
                Ok(closed.len())
            }
            Err(e) => {
                counter!("plantlink_cloud_revocation_reloads_total", "result" => "error")
                    .increment(1);
                tracing::error!(
                    trigger, error = %e,
                    "revocation list not reloaded; the previous list stays in force"
                );
                Err(e)
            }
        }
    }

    /// Reloads whenever the file changes, checking every `every`, until `shutdown`.
    pub async fn watch(self, every: Duration, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            if self.revocations.changed() {
                let _ = self.reload("file changed");
            }
        }
    }
}

/// Describes the metrics of this module and sets them to zero.
pub fn describe_metrics(revocations: &Revocations) {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_counter!(
        "plantlink_cloud_connections_replaced_total",
        Unit::Count,
        "Connections closed because a newer connection of the same gateway was admitted."
    );
    describe_counter!(
        "plantlink_cloud_connections_revoked_total",
        Unit::Count,
        "Live connections closed because a reloaded revocation list revokes their certificate."
    );
    describe_counter!(
        "plantlink_cloud_handshakes_revoked_total",
        Unit::Count,
        "Handshakes refused because the certificate is revoked, by the entry that matched (serial, fingerprint, gateway)."
    );
    describe_counter!(
        "plantlink_cloud_revocation_reloads_total",
        Unit::Count,
        "Reloads of the revocation list, by result (ok, error: the previous list stays)."
    );
    describe_gauge!(
        "plantlink_cloud_revocation_entries",
        Unit::Count,
        "Entries of the revocation list in force."
    );
    counter!("plantlink_cloud_connections_replaced_total").increment(0);
    counter!("plantlink_cloud_connections_revoked_total").increment(0);
    for by in ["serial", "fingerprint", "gateway"] {
        counter!("plantlink_cloud_handshakes_revoked_total", "by" => by).increment(0);
    }
    for result in ["ok", "error"] {
        counter!("plantlink_cloud_revocation_reloads_total", "result" => result).increment(0);
    }
    gauge!("plantlink_cloud_revocation_entries").set(revocations.current().len() as f64);
}

/// A client verifier that also refuses revoked certificates.
#[derive(Debug)]
struct Revoking {
    inner: Arc<dyn ClientCertVerifier>,
    revocations: Revocations,
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
        if let Some(m) = self.revocations.current().check(&id) {
            counter!("plantlink_cloud_handshakes_revoked_total", "by" => m.label()).increment(1);
            tracing::warn!(
                gateway = %id.gateway, tenant = %id.tenant, serial = %id.serial,
                by = m.label(), "refused a revoked certificate"
            );
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
/// fleet CA, the certificates `revocations` names refused, and the transport's limits
/// ([`MAX_BIDI_STREAMS`], no unidirectional streams, [`IDLE_TIMEOUT`], [`KEEP_ALIVE`]).
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
    revocations: &Revocations,
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
        revocations: revocations.clone(),
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
    // The newest revision both ends know is the session's (frame::ALPNS).
    tls.alpn_protocols = frame::ALPNS.iter().map(|p| p.to_vec()).collect();
    // No session resumption: a resumed session skips the client certificate's verification,
    // so a certificate revoked since would get in again at the TLS layer.
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| SetupError::Tls(e.to_string()))?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_BIDI_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .max_idle_timeout(Some(quinn::IdleTimeout::from(VarInt::from_u32(
            IDLE_TIMEOUT.as_millis() as u32,
        ))))
        .keep_alive_interval(Some(KEEP_ALIVE));
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(transport));
    Ok(config)
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
    let total = read_prefix(recv, max).await?;
    read_body(recv, total, max).await
}

/// Reads a frame's length prefix: the frame's whole length, so that a reader can reserve
/// it before it reads the rest ([`read_body`]).
pub async fn read_prefix(recv: &mut quinn::RecvStream, max: usize) -> Result<usize, ReadError> {
    let mut prefix = [0u8; frame::LENGTH_PREFIX];
    recv.read_exact(&mut prefix).await.map_err(ended)?;
    frame::frame_len(&prefix, max).map_err(|e| ReadError::Protocol(e.to_string()))
}

/// Reads the rest of a frame of `total` bytes whose prefix [`read_prefix`] read, and
/// decodes it.
pub async fn read_body(
    recv: &mut quinn::RecvStream,
    total: usize,
    max: usize,
) -> Result<Frame, ReadError> {
    let mut buf = vec![0u8; total];
    let len = (total - frame::LENGTH_PREFIX) as u32;
    buf[..frame::LENGTH_PREFIX].copy_from_slice(&len.to_be_bytes());
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
