//! `cloud-ingest run`: accepts gateways over QUIC and hands their batches to the [`Sink`].
//!
//! Per connection: [`quic::admit`] binds it to the certificate's identity. The agent sends
//! Batch frames on streams it opens (one per lane). Each stream has a reader and an acker:
//! the reader decodes a frame, checks it, and submits it to the sink, which may make it wait
//! (the pipeline's reading budget); while it waits it reads nothing more, so QUIC flow
//! control pushes back on the gateway and memory stays bounded. The acker answers each batch
//! in order once the sink has committed it. Up to [`STREAM_WINDOW`] batches of a stream are
//! in the pipeline at once, so decoding and copying overlap the previous commit.
//!
//! A batch that cannot be decoded gets an Error frame with its sequence number, a log line
//! naming the gateway, and a count in `plantlink_cloud_batches_rejected_total{reason}`; the
//! connection and its other batches carry on. Readings that no database can hold (a
//! timestamp outside years 1 to 9999, a NUL character in a name) are left out of their
//! batch and counted in `plantlink_cloud_readings_rejected_total{reason}`.

use std::sync::Arc;

use metrics::{counter, gauge};
use plantlink_model::Reading;
use plantlink_wire::batch::{BatchDecoder, DecodeError, Limits};
use plantlink_wire::frame::{Ack, ErrorCode, ErrorFrame, Frame};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::Config;
use crate::pki::GatewayIdentity;
use crate::postgres::maintain;
use crate::sink::{Batch, Outcome, Sink};
use crate::{postgres, quic};

/// Batches of one stream in the pipeline at once.
pub const STREAM_WINDOW: usize = 4;

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

    /// Brings the schema up to date, then serves until `shutdown` turns true; then stops
    /// accepting, closes connections, and lets the writers finish what they hold.
    pub async fn serve(self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let flavor = loop {
            match postgres::connect(&self.config.postgres.url).await {
                Ok(c) => break postgres::migrate(&c, &self.config.postgres).await?,
                Err(e) => {
                    tracing::warn!(error = %e, "PostgreSQL unavailable; trying again in 2 s");
                    tokio::select! {
                        _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                        _ = shutdown.changed() => return Ok(()),
                    }
                }
            }
        };
        let mut tasks = tokio::task::JoinSet::new();
        let sink = Sink::start(self.config.postgres.clone(), flavor, &mut tasks);
        tracing::info!(bind = %self.config.quic.bind, ?flavor, "accepting gateways");
        loop {
            let incoming = tokio::select! {
                i = self.endpoint.accept() => match i { Some(i) => i, None => break },
                _ = shutdown.changed() => break,
            };
            let config = self.config.clone();
            let sink = sink.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => connection(conn, config, sink).await,
                    Err(e) => {
                        counter!("plantlink_cloud_handshakes_refused_total").increment(1);
                        tracing::warn!(%remote, error = %e, "gateway refused at the TLS handshake");
                    }
                }
            });
        }
        self.endpoint.close(0u32.into(), b"shutting down");
        self.endpoint.wait_idle().await;
        drop(sink);
        while tasks.join_next().await.is_some() {}
        Ok(())
    }
}

async fn connection(conn: quinn::Connection, config: Arc<Config>, sink: Sink) {
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
    gauge!("plantlink_cloud_connections").increment(1.0);
    tracing::info!(gateway = %id.gateway, tenant = %id.tenant, remote = %conn.remote_address(), "gateway connected");
    let id = Arc::new(id);
    while let Ok((send, recv)) = conn.accept_bi().await {
        let (replies, pending) = mpsc::channel(STREAM_WINDOW);
        tokio::spawn(acker(send, pending, id.clone()));
        tokio::spawn(stream(
            recv,
            replies,
            id.clone(),
            sink.clone(),
            q.max_batch_bytes as usize,
        ));
    }
    gauge!("plantlink_cloud_connections").decrement(1.0);
    tracing::info!(gateway = %id.gateway, "gateway disconnected");
}

/// What the acker sends for a batch, in the order the batches came.
enum Reply {
    /// An answer known at once (a rejection).
    Now(Frame),
    /// The answer for batch `seq`, once the sink has it.
    Later(u64, oneshot::Receiver<Outcome>),
}

async fn acker(
    mut send: quinn::SendStream,
    mut pending: mpsc::Receiver<Reply>,
    id: Arc<GatewayIdentity>,
) {
    while let Some(reply) = pending.recv().await {
        let frame = match reply {
            Reply::Now(f) => f,
            Reply::Later(seq, rx) => match rx.await {
                Ok(Ok(())) => Frame::Ack(Ack { seq }),
                Ok(Err(why)) => {
                    counter!("plantlink_cloud_batches_rejected_total", "reason" => "storage")
                        .increment(1);
                    tracing::error!(gateway = %id.gateway, seq, %why, "batch not stored");
                    error(ErrorCode::UNAVAILABLE, Some(seq), why)
                }
                Err(_) => error(
                    ErrorCode::UNAVAILABLE,
                    Some(seq),
                    "shutting down; retry".into(),
                ),
            },
        };
        if quic::write_frame(&mut send, &frame).await.is_err() {
            return;
        }
    }
}

/// Why no database can hold a reading, if that is so.
fn unstorable(r: &Reading) -> Option<&'static str> {
    if !maintain::storable(r.ts.0) {
        return Some("timestamp_out_of_range");
    }
    let nul = |s: &str| s.contains('\0');
    if nul(&r.device) || nul(&r.metric) || r.tags.iter().any(|(k, v)| nul(k) || nul(v)) {
        return Some("nul_character");
    }
    None
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
    mut recv: quinn::RecvStream,
    replies: mpsc::Sender<Reply>,
    id: Arc<GatewayIdentity>,
    sink: Sink,
    max_frame: usize,
) {
    let mut decoder = BatchDecoder::new(Limits {
        max_payload_bytes: max_frame,
        ..Limits::default()
    });
    let tenant: Arc<str> = Arc::from(id.tenant.as_str());
    let gateway: Arc<str> = Arc::from(id.gateway.as_str());
    loop {
        let frame = match quic::read_frame(&mut recv, max_frame + 1024).await {
            Ok(f) => f,
            Err(e) => {
                if !e.contains("closed") && !e.contains("finished") && !e.contains("lost") {
                    counter!("plantlink_cloud_batches_rejected_total", "reason" => "protocol")
                        .increment(1);
                    tracing::warn!(gateway = %id.gateway, error = %e, "unreadable frame; closing the stream");
                    let _ = replies
                        .send(Reply::Now(error(ErrorCode::PROTOCOL, None, e)))
                        .await;
                }
                return;
            }
        };
        let Frame::Batch(b) = frame else {
            counter!("plantlink_cloud_batches_rejected_total", "reason" => "protocol").increment(1);
            let reply = error(ErrorCode::PROTOCOL, None, "expected a Batch frame".into());
            if replies.send(Reply::Now(reply)).await.is_err() {
                return;
            }
            continue;
        };
        let mut readings = match decoder.decode(&b.payload) {
            Ok(r) if r.len() == b.readings as usize => r,
            Ok(r) => {
                let why = format!(
                    "batch {} says {} readings but holds {}",
                    b.seq,
                    b.readings,
                    r.len()
                );
                if !reject(&id, &replies, "malformed", ErrorCode::MALFORMED, b.seq, why).await {
                    return;
                }
                continue;
            }
            Err(e) => {
                let (reason, code) = reject_reason(&e);
                if !reject(&id, &replies, reason, code, b.seq, e.to_string()).await {
                    return;
                }
                continue;
            }
        };
        counter!("plantlink_cloud_readings_received_total").increment(readings.len() as u64);
        readings.retain(|r| match unstorable(r) {
            None => true,
            Some(reason) => {
                counter!("plantlink_cloud_readings_rejected_total", "reason" => reason)
                    .increment(1);
                tracing::warn!(gateway = %id.gateway, device = %r.device.escape_debug(), metric = %r.metric.escape_debug(), ts_us = r.ts.0, reason, "reading left out");
                false
            }
        });
        let done = sink
            .submit(Batch {
                tenant: tenant.clone(),
                gateway: gateway.clone(),
                readings,
            })
            .await;
        if replies.send(Reply::Later(b.seq, done)).await.is_err() {
            return;
        }
    }
}

fn error(code: ErrorCode, seq: Option<u64>, reason: String) -> Frame {
    Frame::Error(ErrorFrame { code, seq, reason })
}

/// Counts, logs and answers a rejected batch; false when the stream is gone.
async fn reject(
    id: &GatewayIdentity,
    replies: &mpsc::Sender<Reply>,
    reason: &'static str,
    code: ErrorCode,
    seq: u64,
    why: String,
) -> bool {
    counter!("plantlink_cloud_batches_rejected_total", "reason" => reason).increment(1);
    tracing::warn!(gateway = %id.gateway, tenant = %id.tenant, seq, %why, "batch rejected");
    replies
        .send(Reply::Now(error(code, Some(seq), why)))
        .await
        .is_ok()
}
