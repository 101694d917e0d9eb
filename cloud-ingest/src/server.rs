//! `cloud-ingest run`: accepts gateways over QUIC and writes their batches to PostgreSQL.
//!
//! Per connection: [`quic::admit`] binds it to the certificate's identity, and one PostgreSQL
//! connection serves it. The agent sends Batch frames on streams it opens (one per lane);
//! each stream is handled in order: decode, write, commit, Ack. The next frame is read only
//! after the previous batch is committed, so a slow database stops the reading and QUIC flow
//! control pushes back on the gateway: memory stays bounded. A batch that cannot be decoded
//! gets an Error frame with its sequence number, a log line naming the gateway, and a count
//! in `plantlink_cloud_batches_rejected_total{reason}`; the connection and its other batches
//! carry on.

use std::sync::Arc;

use metrics::{counter, gauge};
use plantlink_wire::batch::{BatchDecoder, DecodeError, Limits};
use plantlink_wire::frame::{Ack, ErrorCode, ErrorFrame, Frame};
use tokio::sync::{Mutex, watch};

use crate::config::Config;
use crate::pki::GatewayIdentity;
use crate::{postgres, quic};

/// A bound listener, ready to serve.
#[derive(Debug)]
pub struct Server {
    endpoint: quinn::Endpoint,
    config: Arc<Config>,
}

impl Server {
    /// Binds the QUIC listener of `config`.
    pub fn bind(config: Config) -> anyhow::Result<Self> {
        let q = &config.quic;
        let tls = quic::server_config(&q.cert, &q.key, &q.client_ca, &q.revoked)?;
        let endpoint = quinn::Endpoint::server(tls, q.bind)
            .map_err(|e| anyhow::anyhow!("quic.bind = {}: cannot listen: {e}", q.bind))?;
        Ok(Self {
            endpoint,
            config: Arc::new(config),
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Serves until `shutdown` turns true; then stops accepting and closes connections.
    pub async fn serve(self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        tracing::info!(bind = %self.config.quic.bind, "accepting gateways");
        loop {
            let incoming = tokio::select! {
                i = self.endpoint.accept() => match i { Some(i) => i, None => break },
                _ = shutdown.changed() => break,
            };
            let config = self.config.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => connection(conn, config).await,
                    Err(e) => {
                        counter!("plantlink_cloud_handshakes_refused_total").increment(1);
                        tracing::warn!(%remote, error = %e, "gateway refused at the TLS handshake");
                    }
                }
            });
        }
        self.endpoint.close(0u32.into(), b"shutting down");
        self.endpoint.wait_idle().await;
        Ok(())
    }
}

async fn connection(conn: quinn::Connection, config: Arc<Config>) {
    let q = &config.quic;
    let (id, _control_send, _control_recv) =
        match quic::admit(&conn, q.max_batch_bytes, q.max_in_flight).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(remote = %conn.remote_address(), error = %e, "gateway not admitted");
                conn.close(1u32.into(), e.to_string().as_bytes());
                return;
            }
        };
    let (client, pg) = match tokio_postgres::connect(&config.postgres.url, tokio_postgres::NoTls)
        .await
    {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(gateway = %id.gateway, error = %e, "PostgreSQL unavailable; closing so the gateway retries");
            conn.close(2u32.into(), b"storage unavailable");
            return;
        }
    };
    tokio::spawn(pg);
    let client = Arc::new(Mutex::new(client));
    gauge!("plantlink_cloud_connections").increment(1.0);
    tracing::info!(gateway = %id.gateway, tenant = %id.tenant, remote = %conn.remote_address(), "gateway connected");
    let id = Arc::new(id);
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(stream(
            send,
            recv,
            id.clone(),
            client.clone(),
            q.max_batch_bytes as usize,
        ));
    }
    gauge!("plantlink_cloud_connections").decrement(1.0);
    tracing::info!(gateway = %id.gateway, "gateway disconnected");
}

fn reject_reason(e: &DecodeError) -> (&'static str, ErrorCode) {
    match e {
        DecodeError::UnsupportedVersion { .. } => {
            ("unsupported_version", ErrorCode::UNSUPPORTED_VERSION)
        }
        DecodeError::TooLarge { .. } => ("too_large", ErrorCode::TOO_LARGE),
        _ => ("malformed", ErrorCode::MALFORMED),
    }
}

async fn stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    id: Arc<GatewayIdentity>,
    client: Arc<Mutex<tokio_postgres::Client>>,
    max_frame: usize,
) {
    let mut decoder = BatchDecoder::new(Limits {
        max_payload_bytes: max_frame,
        ..Limits::default()
    });
    loop {
        let frame = match quic::read_frame(&mut recv, max_frame + 1024).await {
            Ok(f) => f,
            Err(e) => {
                if !e.contains("closed") && !e.contains("finished") && !e.contains("lost") {
                    counter!("plantlink_cloud_batches_rejected_total", "reason" => "protocol")
                        .increment(1);
                    tracing::warn!(gateway = %id.gateway, error = %e, "unreadable frame; closing the stream");
                    let _ =
                        quic::write_frame(&mut send, &error(ErrorCode::PROTOCOL, None, e)).await;
                }
                return;
            }
        };
        let Frame::Batch(b) = frame else {
            counter!("plantlink_cloud_batches_rejected_total", "reason" => "protocol").increment(1);
            let _ = quic::write_frame(
                &mut send,
                &error(ErrorCode::PROTOCOL, None, "expected a Batch frame".into()),
            )
            .await;
            continue;
        };
        let readings = match decoder.decode(&b.payload) {
            Ok(r) if r.len() == b.readings as usize => r,
            Ok(r) => {
                let why = format!(
                    "batch {} says {} readings but holds {}",
                    b.seq,
                    b.readings,
                    r.len()
                );
                reject(
                    &id,
                    &mut send,
                    "malformed",
                    ErrorCode::MALFORMED,
                    b.seq,
                    why,
                )
                .await;
                continue;
            }
            Err(e) => {
                let (reason, code) = reject_reason(&e);
                reject(&id, &mut send, reason, code, b.seq, e.to_string()).await;
                continue;
            }
        };
        counter!("plantlink_cloud_readings_received_total").increment(readings.len() as u64);
        let written = {
            let mut c = client.lock().await;
            postgres::write_batch(&mut c, &id.tenant, &id.gateway, &readings).await
        };
        match written {
            Ok(n) => {
                counter!("plantlink_cloud_readings_written_total", "sink" => "postgres")
                    .increment(n);
                if quic::write_frame(&mut send, &Frame::Ack(Ack { seq: b.seq }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                // Not acknowledged: the agent keeps the batch and sends it again.
                tracing::error!(gateway = %id.gateway, seq = b.seq, error = %e, "PostgreSQL write failed");
                let _ = quic::write_frame(
                    &mut send,
                    &error(
                        ErrorCode::UNAVAILABLE,
                        Some(b.seq),
                        "storage unavailable; retry".into(),
                    ),
                )
                .await;
            }
        }
    }
}

fn error(code: ErrorCode, seq: Option<u64>, reason: String) -> Frame {
    Frame::Error(ErrorFrame { code, seq, reason })
}

async fn reject(
    id: &GatewayIdentity,
    send: &mut quinn::SendStream,
    reason: &'static str,
    code: ErrorCode,
    seq: u64,
    why: String,
) {
    counter!("plantlink_cloud_batches_rejected_total", "reason" => reason).increment(1);
    tracing::warn!(gateway = %id.gateway, tenant = %id.tenant, seq, %why, "batch rejected");
    let _ = quic::write_frame(send, &error(code, Some(seq), why)).await;
}
