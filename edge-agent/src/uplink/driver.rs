//! The uplink's I/O: a QUIC connection to cloud-ingest with mutual TLS, one stream per lane,
//! driven by the [`Scheduler`](super::schedule::Scheduler). Readings are deleted from the
//! queue only when the cloud acknowledges their batch; a lost connection restarts the lanes,
//! so whatever was unacknowledged is sent again (the cloud's writes are idempotent).
//!
//! Poison never blocks a lane. Batches are cut to fit what the cloud announced in `Welcome`
//! (payload bytes, batches in flight) and the wire's decoding limits. A batch the cloud
//! refuses as malformed or too large anyway is not sent again whole: the queue splits it,
//! and a single reading refused on its own goes to the quarantine, while the connection
//! and the other batches carry on. Only transient refusals (a sink unavailable) end the
//! session, and only an ack resets the reconnect backoff.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use metrics::{counter, gauge};
use plantlink_wire::BatchEncoder;
use plantlink_wire::batch::Limits;
use plantlink_wire::frame::{self, Batch, ErrorCode, Frame, Hello, Lane, QueueReport, Status};
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::schedule::{Decision, Live, Scheduler, Settings};
use crate::config::Uplink;
use crate::ingest::{QueueFigures, QueueView, Requests, UplinkRequest};

const MAX_FRAME: usize = 64 << 20;
/// How often the agent tells the cloud about its queue.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Most devices told per queue report (32 frames): a gateway of 100,000 devices has told
/// them all two minutes after it connects.
const DEVICES_PER_REPORT: usize = 32 * frame::DEVICES_PER_FRAME;

/// Every this many reports (10 minutes) every device is told again, which repairs a report
/// the cloud could not keep.
const DEVICES_REFRESH: u64 = 120;

fn tls(cfg: &Uplink) -> anyhow::Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let ca = CertificateDer::from_pem_file(&cfg.ca)
        .with_context(|| format!("uplink.ca = {}", cfg.ca.display()))?;
    roots
        .add(ca)
        .with_context(|| format!("uplink.ca = {}", cfg.ca.display()))?;
    let cert = CertificateDer::pem_file_iter(&cfg.cert)
        .with_context(|| format!("uplink.cert = {}", cfg.cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("uplink.cert = {}", cfg.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&cfg.key)
        .with_context(|| format!("uplink.key = {}", cfg.key.display()))?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(cert, key)
        .context("uplink.cert and uplink.key do not belong together")?;
    // The cloud picks the newest revision both know (frame::ALPNS).
    tls.alpn_protocols = frame::ALPNS.iter().map(|p| p.to_vec()).collect();
    Ok(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls)?,
    )))
}

async fn ask<T>(
    queue: &Requests,
    make: impl FnOnce(oneshot::Sender<T>) -> UplinkRequest,
) -> anyhow::Result<T> {
    queue
        .ask(make)
        .await
        .ok_or_else(|| anyhow::anyhow!("the queue writer stopped"))
}

/// Runs the uplink until `shutdown`.
pub async fn run(
    cfg: Uplink,
    gateway_id: String,
    queue: Requests,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let client = tls(&cfg)?;
    let mut endpoint = quinn::Endpoint::client("0.0.0.0:0".parse()?)?;
    endpoint.set_default_client_config(client);
    let start = Instant::now();
    let mut sched = Scheduler::new(
        Settings {
            batch_max_readings: cfg.batch_max_readings,
            linger: Duration::from_millis(cfg.batch_linger_ms),
            max_in_flight: cfg.max_in_flight,
            backlog_rate: cfg.backlog_rate,
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
        },
        Duration::ZERO,
    );
    let mut jitter = (std::process::id() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // Cleared when a cloud closes the control stream at a device report (it is older
    // than this agent): later connections keep their control stream without them.
    let mut device_reports = true;
    loop {
        let result = tokio::select! {
            r = session(&endpoint, &cfg, &gateway_id, &queue, &mut sched, start, &mut device_reports) => r,
            _ = shutdown.changed() => break,
        };
        gauge!("plantlink_edge_uplink_connected").set(0.0);
        match result {
            Err(e) => {
                let e = format!("{e:#}");
                tracing::warn!(server = %cfg.server, error = %e, "uplink down");
                crate::status::uplink_down(Some(e));
            }
            Ok(()) => crate::status::uplink_down(None),
        }
        counter!("plantlink_edge_uplink_reconnects_total").increment(1);
        jitter = jitter
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        let delay = sched.on_disconnected((jitter >> 11) as f64 / (1u64 << 53) as f64);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => break,
        }
    }
    endpoint.close(0u32.into(), b"agent stopping");
    Ok(())
}

async fn session(
    endpoint: &quinn::Endpoint,
    cfg: &Uplink,
    gateway_id: &str,
    queue: &Requests,
    sched: &mut Scheduler,
    start: Instant,
    device_reports: &mut bool,
) -> anyhow::Result<()> {
    let addr = tokio::net::lookup_host(&cfg.server)
        .await
        .with_context(|| format!("uplink.server = {}", cfg.server))?
        .next()
        .with_context(|| format!("uplink.server = {} resolves to nothing", cfg.server))?;
    let conn = endpoint
        .connect(addr, &cfg.server_name)?
        .await
        .context("QUIC/TLS handshake")?;
    let protocol = conn
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol)
        .unwrap_or_default();
    let (mut control, mut control_rx) = conn.open_bi().await?;
    let hello = Frame::Hello(Hello {
        gateway_id: gateway_id.to_owned(),
        agent: format!("edge-agent/{}", env!("CARGO_PKG_VERSION")),
        codec_version: plantlink_wire::batch::CODEC_VERSION,
    });
    write_frame(&mut control, &hello).await?;
    let max_batch_bytes = match read_frame(&mut control_rx).await? {
        Frame::Welcome(w) => {
            tracing::info!(server = %cfg.server, tenant = %w.tenant, max_batch_bytes = w.max_batch_bytes,
                max_in_flight = w.max_in_flight, protocol = %String::from_utf8_lossy(&protocol), "uplink connected");
            sched.limit_in_flight(w.max_in_flight as usize);
            (w.max_batch_bytes as usize).max(1024)
        }
        Frame::Error(e) => anyhow::bail!("cloud refused the gateway: {}", e.reason),
        other => anyhow::bail!("unexpected answer to Hello: {other:?}"),
    };
    ask(queue, UplinkRequest::Restart).await?;
    gauge!("plantlink_edge_uplink_connected").set(1.0);
    crate::status::uplink_connected();
    // Which schema set is in force: the cloud sends the tenant's if it differs. A cloud-ingest
    // older than the registry closes the control stream at this frame: the session goes on
    // without it (no schema pushes, no queue reports); upgrade cloud-ingest first.
    let in_force = ask(queue, UplinkRequest::SchemasInForce).await?;
    let mut control_up = write_frame(&mut control, &Frame::SchemasApplied(in_force))
        .await
        .is_ok();
    // Devices go with each queue report: everything on the first (it comes at once) and
    // every DEVICES_REFRESH, else what changed, DEVICES_PER_REPORT at most.
    let mut reported_devices = false;
    let mut reports = 0u64;
    let (control_tx, mut control_in) = mpsc::unbounded_channel::<anyhow::Result<Frame>>();
    tokio::spawn(async move {
        loop {
            let f = read_frame(&mut control_rx).await;
            let stop = f.is_err();
            if control_tx.send(f).is_err() || stop {
                break;
            }
        }
    });
    let mut fit = Fit::new(max_batch_bytes);

    // One stream per lane; a task per stream forwards what the cloud answers.
    let (answers_tx, mut answers) = mpsc::unbounded_channel::<anyhow::Result<Frame>>();
    let mut lanes = Vec::new();
    for _ in 0..2 {
        let (send, mut recv) = conn.open_bi().await?;
        let tx = answers_tx.clone();
        tokio::spawn(async move {
            loop {
                let f = read_frame(&mut recv).await;
                let stop = f.is_err();
                if tx.send(f).is_err() || stop {
                    break;
                }
            }
        });
        lanes.push(send);
    }
    let mut encoder = BatchEncoder::default();
    let mut live_since: Option<Instant> = None;
    let mut wake = Instant::now();
    // The queue's state goes to the cloud on the first stream every few seconds, for its
    // `/v1/pipeline/lag`.
    let mut report = tokio::time::interval(STATUS_EVERY);
    loop {
        tokio::select! {
            _ = report.tick(), if control_up => {
                let figures: QueueFigures = ask(queue, UplinkRequest::Figures).await?;
                let status = queue_report(&protocol, &figures, sched.in_flight() as u32);
                if write_frame(&mut control, &status).await.is_err() {
                    control_closed(&mut control_up);
                } else if *device_reports {
                    let reset = reports.is_multiple_of(DEVICES_REFRESH);
                    reports += 1;
                    match send_devices(queue, &mut control, reset).await? {
                        Some(frames) => reported_devices |= frames > 0,
                        None => control_closed(&mut control_up),
                    }
                }
            }
            pushed = control_in.recv(), if control_up => {
                match pushed {
                    Some(Ok(Frame::Schemas(set))) => {
                        let version = set.version;
                        let applied = ask(queue, |reply| UplinkRequest::Schemas { set, reply })
                            .await?
                            .map_err(anyhow::Error::msg)
                            .with_context(|| format!("applying schema set {version}"))?;
                        if write_frame(&mut control, &Frame::SchemasApplied(applied)).await.is_err() {
                            control_closed(&mut control_up);
                        }
                    }
                    Some(Ok(other)) => tracing::debug!(frame = ?other, "ignored on the control stream"),
                    Some(Err(_)) | None => control_closed(&mut control_up),
                }
            }
            answer = answers.recv() => {
                match answer.context("answer streams closed")?? {
                    Frame::Ack(a) => {
                        if let Some((batch, _lane, n)) = sched.on_ack(a.seq) {
                            let deleted = ask(queue, |reply| UplinkRequest::Ack { batch, reply }).await?.map_err(anyhow::Error::msg)?;
                            counter!("plantlink_edge_batches_acked_total").increment(1);
                            crate::status::uplink_acked();
                            counter!("plantlink_edge_readings_acked_total").increment(deleted.min(n as u64));
                        }
                    }
                    Frame::Error(e) => match (e.seq, permanent(e.code)) {
                        (Some(seq), Some(reason)) => {
                            if let Some((batch, _lane, n)) = sched.on_refused(seq) {
                                tracing::warn!(seq, readings = n, reason, detail = %e.reason,
                                    "the cloud refused a batch; isolating the readings at fault");
                                refuse(queue, batch, reason, e.reason).await?;
                            }
                        }
                        _ => anyhow::bail!("cloud refused batch {:?}: {} (code {})", e.seq, e.reason, e.code.0),
                    },
                    other => anyhow::bail!("unexpected frame from the cloud: {other:?}"),
                }
                counter!("plantlink_edge_uplink_bytes_sent_total").absolute(conn.stats().udp_tx.bytes);
            }
            _ = tokio::time::sleep_until(wake) => {}
            reason = conn.closed() => anyhow::bail!("connection closed: {reason}"),
        }
        // The control stream ended while the connection lives on, after a device report: an
        // older cloud that does not know the frame.
        if !control_up && reported_devices && *device_reports && conn.close_reason().is_none() {
            *device_reports = false;
            tracing::warn!(
                "the cloud closed the control stream after a device report: it is older than \
                 this agent, so devices' types and schemas are not reported until the agent \
                 restarts; upgrade cloud-ingest"
            );
        }
        // Send whatever the scheduler allows now.
        loop {
            let view: QueueView = ask(queue, UplinkRequest::View).await?;
            let now = Instant::now();
            if view.live_waiting == 0 {
                live_since = None;
            } else if live_since.is_none() {
                live_since = Some(now);
            }
            let live = Live {
                waiting: view.live_waiting as usize,
                oldest_wait: live_since.map_or(Duration::ZERO, |t| now - t),
            };
            match sched.next(now - start, live, view.backlog_waiting) {
                Decision::Send { lane, max } => {
                    let max = max.min(fit.readings);
                    let read = ask(queue, |reply| UplinkRequest::Read { lane, max, reply }).await?;
                    let Some(batch) = read.map_err(anyhow::Error::msg)? else {
                        // The estimate was high (evictions): nothing to send in this lane.
                        wake = now + Duration::from_millis(50);
                        break;
                    };
                    let payload = encoder.encode(&batch.readings);
                    if let Err(why) = fit.check(&batch.readings, payload.len()) {
                        tracing::debug!(readings = batch.readings.len(), %why, "batch cut smaller");
                        refuse(queue, batch.id, "too_large", why).await?;
                        continue;
                    }
                    let seq = sched.on_sent(now - start, batch.id, lane, batch.readings.len());
                    let f = Frame::Batch(Batch {
                        seq,
                        lane,
                        readings: batch.readings.len() as u32,
                        payload,
                    });
                    let stream = &mut lanes[if lane == Lane::Live { 0 } else { 1 }];
                    write_frame(stream, &f).await?;
                    if lane == Lane::Live {
                        live_since = None;
                    }
                }
                Decision::WaitUntil(t) => {
                    wake = start + t;
                    break;
                }
                Decision::Idle => {
                    // New readings are not signalled: look again shortly.
                    wake = now + Duration::from_millis(50);
                    break;
                }
            }
        }
    }
}

/// Sends what changed of the devices (everything again after a `reset`), at most
/// [`DEVICES_PER_REPORT`], in frames of at most [`frame::DEVICES_PER_FRAME`]: how many
/// frames, or `None` when the control stream is closed.
async fn send_devices(
    queue: &Requests,
    control: &mut quinn::SendStream,
    reset: bool,
) -> anyhow::Result<Option<usize>> {
    let devices = ask(queue, |reply| UplinkRequest::Devices {
        reset,
        limit: DEVICES_PER_REPORT,
        reply,
    })
    .await?;
    for chunk in devices.chunks(frame::DEVICES_PER_FRAME) {
        let f = Frame::Devices(frame::DeviceReport {
            devices: chunk.to_vec(),
        });
        if write_frame(control, &f).await.is_err() {
            return Ok(None);
        }
    }
    if !devices.is_empty() {
        tracing::debug!(devices = devices.len(), reset, "reported devices");
    }
    Ok(Some(devices.len().div_ceil(frame::DEVICES_PER_FRAME)))
}

/// The control stream ended while the connection lives on (an older cloud-ingest closes it
/// at a frame it does not know): batches keep flowing.
fn control_closed(up: &mut bool) {
    if std::mem::replace(up, false) {
        tracing::warn!(
            "the cloud closed the control stream (a cloud-ingest older than this agent?): \
             no payload schema pushes or queue reports on this connection; batches go on"
        );
    }
}

/// The refusals that sending again cannot cure: the batch is split or quarantined. Others
/// (a sink unavailable) end the session, and the batch is sent again after the backoff.
fn permanent(code: ErrorCode) -> Option<&'static str> {
    match code {
        ErrorCode::MALFORMED => Some("malformed"),
        ErrorCode::TOO_LARGE => Some("too_large"),
        _ => None,
    }
}

async fn refuse(
    queue: &Requests,
    batch: u64,
    reason: &'static str,
    detail: String,
) -> anyhow::Result<()> {
    let r = ask(queue, |reply| UplinkRequest::Refuse {
        batch,
        reason,
        detail,
        reply,
    })
    .await?
    .map_err(anyhow::Error::msg)?;
    counter!("plantlink_edge_batches_refused_total", "reason" => reason).increment(1);
    tracing::debug!(?r, "refused batch handled");
    Ok(())
}

/// How many readings fit in a batch the cloud accepts, learnt from the batches encoded so
/// far: their payload bytes per reading against `Welcome.max_batch_bytes` (with a quarter
/// spare), and the strings the cloud's decoder would hold against [`Limits`].
#[derive(Debug)]
struct Fit {
    max_bytes: usize,
    limits: Limits,
    /// Most readings to ask the queue for.
    readings: usize,
}

impl Fit {
    fn new(max_bytes: usize) -> Self {
        let limits = Limits::default();
        Self {
            max_bytes,
            readings: limits.max_readings,
            limits,
        }
    }

    /// Whether a batch of `readings`, encoded in `payload` bytes, fits; learns from it.
    fn check(
        &mut self,
        readings: &[plantlink_model::Reading],
        payload: usize,
    ) -> Result<(), String> {
        let n = readings.len().max(1);
        let per_reading = payload.div_ceil(n).max(1);
        let strings: usize = readings
            .iter()
            .map(|r| {
                r.device.len()
                    + r.metric.len()
                    + r.tags.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
            })
            .sum();
        let strings_per_reading = strings.div_ceil(n).max(1);
        let tags: usize = readings.iter().map(|r| r.tags.len()).sum();
        let tags_per_reading = tags.div_ceil(n).max(1);
        let string_budget = self
            .limits
            .max_decoded_string_bytes
            .min(self.limits.max_body_bytes / 2);
        self.readings = (self.max_bytes * 3 / 4 / per_reading)
            .min(string_budget / strings_per_reading)
            .min(self.limits.max_decoded_tags / tags_per_reading)
            .clamp(1, self.limits.max_readings);
        if payload > self.max_bytes {
            return Err(format!(
                "{n} readings encode to {payload} bytes, over the cloud's max_batch_bytes = {}",
                self.max_bytes
            ));
        }
        if tags > self.limits.max_decoded_tags {
            return Err(format!(
                "{n} readings hold {tags} tags, over the {} a batch may expand to",
                self.limits.max_decoded_tags
            ));
        }
        if strings > string_budget {
            return Err(format!(
                "{n} readings hold {strings} bytes of names and tags, over the {string_budget} a batch may expand to"
            ));
        }
        Ok(())
    }
}

async fn write_frame(send: &mut quinn::SendStream, f: &Frame) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    frame::encode_frame(f, &mut buf);
    send.write_all(&buf).await.context("sending to the cloud")
}

async fn read_frame(recv: &mut quinn::RecvStream) -> anyhow::Result<Frame> {
    let mut prefix = [0u8; frame::LENGTH_PREFIX];
    recv.read_exact(&mut prefix)
        .await
        .context("reading from the cloud")?;
    let total = frame::frame_len(&prefix, MAX_FRAME)?;
    let mut buf = vec![0u8; total];
    buf[..frame::LENGTH_PREFIX].copy_from_slice(&prefix);
    recv.read_exact(&mut buf[frame::LENGTH_PREFIX..])
        .await
        .context("reading from the cloud")?;
    Ok(frame::decode_frame(&buf, MAX_FRAME)?.0)
}

/// The queue report for a session that negotiated `protocol`: a cloud that speaks revision
/// 1.1 gets bytes and the oldest reading's age, an older one the frame it knows.
fn queue_report(protocol: &[u8], f: &QueueFigures, in_flight: u32) -> Frame {
    let status = Status {
        queued_readings: f.view.queued,
        live_waiting: f.view.live_waiting,
        backlog: f.view.backlog_waiting,
        in_flight,
    };
    if protocol == frame::ALPN_1_1 {
        Frame::QueueReport(QueueReport {
            status,
            queued_bytes: f.bytes,
            oldest_age_ms: f.oldest_age_ms,
        })
    } else {
        Frame::Status(status)
    }
}

#[cfg(test)]
mod tests {
    use plantlink_model::{Reading, Timestamp};

    use super::*;

    #[test]
    fn a_cloud_of_revision_1_gets_status_and_one_of_1_1_the_queue_report() {
        let f = QueueFigures {
            view: QueueView {
                live_waiting: 3,
                backlog_waiting: true,
                queued: 40,
            },
            bytes: 5_120,
            oldest_age_ms: Some(61_000),
        };
        let status = Status {
            queued_readings: 40,
            live_waiting: 3,
            backlog: true,
            in_flight: 2,
        };
        assert_eq!(queue_report(frame::ALPN, &f, 2), Frame::Status(status));
        assert_eq!(queue_report(b"", &f, 2), Frame::Status(status));
        assert_eq!(
            queue_report(frame::ALPN_1_1, &f, 2),
            Frame::QueueReport(QueueReport {
                status,
                queued_bytes: 5_120,
                oldest_age_ms: Some(61_000),
            })
        );
    }

    fn readings(n: usize, tag_len: usize) -> Vec<Reading> {
        (0..n)
            .map(|i| {
                let mut r = Reading::new("t", "press01", "temperature", Timestamp(i as i64), 1.0);
                r.tags.insert("note".into(), "x".repeat(tag_len));
                r
            })
            .collect()
    }

    #[test]
    fn batches_are_cut_to_the_clouds_bytes_and_the_decoders_string_budget() {
        let mut fit = Fit::new(10_000);
        assert_eq!(fit.readings, Limits::default().max_readings);
        // 1000 readings in 20,000 bytes: over 10,000; next time at most 3/4 x 10,000 / 20.
        let err = fit.check(&readings(1000, 1), 20_000).unwrap_err();
        assert!(err.contains("max_batch_bytes = 10000"), "{err}");
        assert_eq!(fit.readings, 375);
        assert!(fit.check(&readings(375, 1), 7_500).is_ok());
        // Long tag values compress well but expand when decoded: the string budget caps them.
        let mut fit = Fit::new(8 << 20);
        let budget = Limits::default()
            .max_decoded_string_bytes
            .min(Limits::default().max_body_bytes / 2);
        let big = readings(20_000, 1000);
        let err = fit.check(&big, 100_000).unwrap_err();
        assert!(err.contains("may expand to"), "{err}");
        // 7 + 11 + 4 + 1000 bytes of names and tags per reading.
        assert_eq!(fit.readings, budget / 1022);
    }
}
