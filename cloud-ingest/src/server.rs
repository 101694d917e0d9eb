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
//! connection and its other batches carry on.
//!
//! Single readings are refused, not their batch ([`verdict`]): those that no database can
//! hold (a timestamp outside years 1 to 9999, a NUL character in a name) and those outside
//! the event-time window (`[ingest]`: older than `max_past_days`, by default the raw
//! retention, or more than `max_future_secs` ahead of the cloud's clock when the batch
//! arrived). They are not stored in `raw_metrics`, not alerted on and not sent to the
//! readings topic; each is kept in `refused_readings` (committed before the batch is
//! acknowledged, so none is lost with Kafka off) and goes to the DLQ with its reason, is
//! counted in
//! `plantlink_cloud_readings_rejected_total{tenant,reason}`, and the batch gets one log line
//! for all of them. The rest of the batch is stored and acknowledged as usual.

use std::sync::Arc;

use metrics::{counter, gauge};
use plantlink_model::Reading;
use plantlink_wire::batch::{BatchDecoder, DecodeError, Limits};
use plantlink_wire::frame::{Ack, ErrorCode, ErrorFrame, Frame, Lane};
use tokio::sync::{mpsc, oneshot, watch};

use crate::alerting::service::{Alerts, Feed};
use crate::api::App;
use crate::config::{Config, Roles, Window};
use crate::kafka::{self, DeadLetter, Deliveries, Kafka};
use crate::pki::GatewayIdentity;
use crate::postgres::maintain;
use crate::sink::{Batch, Outcome, Sink, Ticket};
use crate::status::Gateways;
use crate::{postgres, quic};

/// Batches of one stream in the pipeline at once.
pub const STREAM_WINDOW: usize = 4;

/// A bound listener, ready to serve.
#[derive(Debug)]
pub struct Server {
    /// The QUIC listener; none when this process is not a receiver.
    endpoint: Option<quinn::Endpoint>,
    config: Arc<Config>,
    /// What this process does.
    roles: Roles,
    /// The revocation list in force and the live connections, one per gateway.
    reloader: quic::Reloader,
}

impl Server {
    /// Binds the QUIC listener of `config`, for all three roles in one process.
    pub fn bind(config: Config) -> anyhow::Result<Self> {
        Self::bind_roles(config, Roles::ALL)
    }

    /// Prepares a process of `roles`: binds the QUIC listener if it is a receiver.
    pub fn bind_roles(config: Config, roles: Roles) -> anyhow::Result<Self> {
        roles.check(&config)?;
        let q = &config.quic;
        let revocations = quic::Revocations::load(q.revocation_file.as_deref(), &q.revoked)?;
        if !q.revoked.is_empty() {
            tracing::warn!(
                "quic.revoked is read only at start; move its ids to quic.revocation_file as \
                 gateway:<id> lines (see deploy/PKI.md) so that SIGHUP reloads them"
            );
        }
        let endpoint = if roles.receiver {
            let tls = quic::server_config(&q.cert, &q.key, &q.client_ca, &revocations)?;
            Some(
                quinn::Endpoint::server(tls, q.bind)
                    .map_err(|e| anyhow::anyhow!("quic.bind = {}: cannot listen: {e}", q.bind))?,
            )
        } else {
            None
        };
        Ok(Self {
            endpoint,
            config: Arc::new(config),
            roles,
            reloader: quic::Reloader {
                revocations,
                live: quic::Live::default(),
            },
        })
    }

    /// Reloads the revocation list and closes the connections it revokes (SIGHUP).
    pub fn reloader(&self) -> quic::Reloader {
        self.reloader.clone()
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        match &self.endpoint {
            Some(e) => e.local_addr(),
            None => Err(std::io::Error::other("not a receiver: no QUIC listener")),
        }
    }

    /// Brings the schema up to date, then serves until `shutdown` turns true; then stops
    /// accepting, closes connections, and lets the writers finish what they hold.
    pub async fn serve(self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let roles = self.roles;
        let mut tasks = tokio::task::JoinSet::new();
        // A receiver of the scale-out mode needs no PostgreSQL: what it accepts goes to Kafka.
        let flavor = if roles.writer || roles.alerting {
            loop {
                match postgres::connect(&self.config.postgres.url).await {
                    Ok(c) => {
                        break Some(postgres::migrate_for_run(&c, &self.config.postgres).await?);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "PostgreSQL unavailable; trying again in 2 s");
                        tokio::select! {
                            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                            _ = shutdown.changed() => return Ok(()),
                        }
                    }
                }
            }
        } else {
            None
        };
        let sink = if roles.writer
            && let Some(flavor) = flavor
        {
            Some(Sink::start(
                self.config.postgres.clone(),
                flavor,
                &mut tasks,
            ))
        } else {
            None
        };
        let kafka = match &self.config.kafka {
            Some(k) => {
                let kafka = Kafka::new(k, self.config.postgres.max_pending_readings)?;
                let creator = kafka.clone();
                // Topics are made in the background: an unreachable cluster must not keep
                // the service from starting; records wait in the producer meanwhile. A
                // scale-out receiver waits for them before admitting gateways: it must know
                // the backbone topic's partition count before it places a device.
                let (checked_tx, mut checked) = watch::channel(false);
                tokio::spawn(async move {
                    let mut wait = std::time::Duration::from_secs(1);
                    while let Err(e) = creator.ensure_topics().await {
                        tracing::warn!(error = %e, retry_in = ?wait, "Kafka topics not checked yet");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(std::time::Duration::from_secs(60));
                    }
                    let _ = checked_tx.send(true);
                });
                if roles.scale_out() && (roles.receiver || roles.alerting) {
                    tokio::select! {
                        _ = checked.wait_for(|c| *c) => {}
                        _ = shutdown.changed() => return Ok(()),
                    }
                }
                Some(kafka)
            }
            None => None,
        };
        if roles.scale_out()
            && roles.writer
            && let (Some(k), Some(sink)) = (&kafka, &sink)
        {
            // One consumer per lane: backfill never waits in front of live readings.
            for (topic, group, _) in k.config().lanes() {
                let writer = crate::backbone::Writer::new(
                    k.clone(),
                    sink.clone(),
                    &self.config.postgres.url,
                    self.config.postgres.flush_max_readings,
                    (&topic, &group),
                )?;
                let stop = shutdown.clone();
                tasks.spawn(async move {
                    if let Err(e) = writer.run(stop).await {
                        tracing::error!(error = %e, "the backbone writer stopped");
                    }
                });
            }
        }
        if roles.scale_out()
            && roles.alerting
            && self.config.alerting.enabled
            && let Some(k) = &kafka
        {
            for (topic, _, group) in k.config().lanes() {
                let member = crate::backbone::alerting::Alerter::new(
                    k.clone(),
                    self.config.alerting.clone(),
                    &self.config.postgres.url,
                    &mut tasks,
                    (&topic, &group),
                )?;
                let stop = shutdown.clone();
                tasks.spawn(async move {
                    if let Err(e) = member.run(stop).await {
                        tracing::error!(error = %e, "the alerting member stopped");
                    }
                });
            }
        }
        // The single-node mode evaluates in process what the receiver accepts.
        let alerts = (!roles.scale_out() && self.config.alerting.enabled).then(|| {
            crate::alerting::service::start(
                self.config.alerting.clone(),
                self.config.postgres.url.clone(),
                kafka.clone(),
                &mut tasks,
            )
        });
        if let Some(a) = &alerts {
            a.ready(std::time::Duration::from_secs(5)).await;
        }
        let gateways = Gateways::default();
        if let Some(api) = &self.config.api {
            let listener = tokio::net::TcpListener::bind(api.bind)
                .await
                .map_err(|e| anyhow::anyhow!("api.bind = {}: cannot listen: {e}", api.bind))?;
            let app = App::new(
                &self.config.postgres.url,
                &api.tokens,
                gateways.clone(),
                kafka.clone(),
                sink.clone(),
            )
            .with_limits(api.limits())
            .with_alerts(alerts.clone())
            .ready_on_kafka(roles.scale_out() && !roles.writer && !roles.alerting);
            let mut stop = shutdown.clone();
            tracing::info!(bind = %api.bind, "query API listening");
            tasks.spawn(async move {
                let served = axum::serve(listener, app.router())
                    .with_graceful_shutdown(async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "query API stopped");
                }
            });
        }
        let memory =
            crate::memory::Memory::new((self.config.ingest.max_buffered_mib as usize) << 20);
        let Some(endpoint) = self.endpoint else {
            // A writer only: it runs until told to stop, then stops as the receiver does
            // (a round that cannot be written is read again by the next owner).
            tracing::info!(%roles, "running");
            let _ = shutdown.wait_for(|s| *s).await;
            drop(sink);
            let drained = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                while tasks.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                tracing::warn!(
                    "stopping with a round unwritten; its partitions are read again by the next writer"
                );
                tasks.abort_all();
            }
            if let Some(k) = kafka {
                tokio::task::spawn_blocking(move || k.flush(std::time::Duration::from_secs(5)))
                    .await?;
            }
            return Ok(());
        };
        let backbone = roles.scale_out().then(|| {
            let max = self.config.postgres.max_pending_readings.max(1);
            (Arc::new(tokio::sync::Semaphore::new(max)), max)
        });
        tracing::info!(bind = %self.config.quic.bind, %roles, flavor = ?sink.as_ref().map(Sink::flavor), kafka = kafka.is_some(), "accepting gateways");
        quic::describe_metrics(&self.reloader.revocations);
        let poll = self.config.quic.revocation_poll_secs;
        if poll > 0 && self.reloader.revocations.file().is_some() {
            tokio::spawn(
                self.reloader
                    .clone()
                    .watch(std::time::Duration::from_secs(poll), shutdown.clone()),
            );
        }
        let registry =
            crate::registry::Registry::start(&self.config.postgres.url, shutdown.clone());
        loop {
            let incoming = tokio::select! {
                i = endpoint.accept() => match i { Some(i) => i, None => break },
                _ = shutdown.changed() => break,
            };
            let config = self.config.clone();
            let reloader = self.reloader.clone();
            let sinks = Sinks {
                postgres: if roles.scale_out() {
                    None
                } else {
                    sink.clone()
                },
                backbone: backbone.clone(),
                kafka: kafka.clone(),
                gateways: gateways.clone(),
                alerts: alerts.clone(),
                memory: memory.clone(),
                registry: registry.clone(),
            };
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => connection(conn, config, sinks, reloader).await,
                    Err(e) => {
                        counter!("plantlink_cloud_handshakes_refused_total").increment(1);
                        tracing::warn!(%remote, error = %e, "gateway refused at the TLS handshake");
                    }
                }
            });
        }
        endpoint.close(0u32.into(), b"shutting down");
        endpoint.wait_idle().await;
        drop(sink);
        drop(alerts);
        // Writers finish what they hold; a sink that cannot (Kafka unreachable, deliveries
        // without a local timeout) must not keep the service from stopping: whatever is not
        // acknowledged is sent again by the gateways.
        let drained = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("stopping with writes still pending; gateways will resend them");
            tasks.abort_all();
        }
        if let Some(k) = kafka {
            tokio::task::spawn_blocking(move || k.flush(std::time::Duration::from_secs(5))).await?;
        }
        Ok(())
    }
}

/// Where a stream's batches go.
#[derive(Debug, Clone)]
struct Sinks {
    /// The in-process writer (single-node mode).
    postgres: Option<Sink>,
    /// The scale-out mode: batches go to Kafka's backbone topic, holding this many readings
    /// at most until Kafka has them.
    backbone: Option<(Arc<tokio::sync::Semaphore>, usize)>,
    kafka: Option<Kafka>,
    gateways: Gateways,
    alerts: Option<Alerts>,
    /// The bytes that batches being read, decoded and written may hold.
    memory: crate::memory::Memory,
    /// The payload schema registry, pushed to gateways.
    registry: crate::registry::Registry,
}

/// What a stream's reader and acker share.
#[derive(Debug)]
struct Ctx {
    id: GatewayIdentity,
    tenant: Arc<str>,
    gateway: Arc<str>,
    sinks: Sinks,
    /// The event-time window of accepted readings.
    window: Window,
}

async fn connection(
    conn: quinn::Connection,
    config: Arc<Config>,
    sinks: Sinks,
    reloader: quic::Reloader,
) {
    let q = &config.quic;
    let (id, control_send, control_recv) =
        match quic::admit(&conn, q.max_batch_bytes, q.max_in_flight).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(remote = %conn.remote_address(), error = %e, "gateway not admitted");
                conn.close(quic::CLOSE_NOT_ADMITTED.into(), e.to_string().as_bytes());
                return;
            }
        };
    // One connection per gateway: this one replaces an older one. A certificate revoked
    // since its handshake is closed here.
    if let Err(m) = reloader.live.register(&conn, &id, &reloader.revocations) {
        tracing::warn!(gateway = %id.gateway, serial = %id.serial, by = m.label(), "refused a revoked certificate");
        let reason = format!("certificate revoked (by {})", m.label());
        conn.close(quic::CLOSE_REVOKED.into(), reason.as_bytes());
        return;
    }
    gauge!("plantlink_cloud_connections").increment(1.0);
    sinks.gateways.connected(&id.gateway, &id.tenant);
    tracing::info!(gateway = %id.gateway, tenant = %id.tenant, serial = %id.serial, remote = %conn.remote_address(), "gateway connected");
    let ctx = Arc::new(Ctx {
        tenant: Arc::from(id.tenant.as_str()),
        gateway: Arc::from(id.gateway.as_str()),
        id,
        sinks,
        window: config.window(),
    });
    // The first stream carries the gateway's queue reports after Hello/Welcome, and the
    // payload schema set both ways.
    tokio::spawn(control(ctx.clone(), control_send, control_recv));
    while let Ok((send, recv)) = conn.accept_bi().await {
        let (replies, pending) = mpsc::channel(STREAM_WINDOW);
        tokio::spawn(acker(send, pending, ctx.clone()));
        tokio::spawn(stream(
            recv,
            replies,
            ctx.clone(),
            q.max_batch_bytes as usize,
        ));
    }
    reloader
        .live
        .deregister(&conn, &ctx.id.tenant, &ctx.id.gateway);
    gauge!("plantlink_cloud_connections").decrement(1.0);
    ctx.sinks
        .gateways
        .disconnected(&ctx.id.tenant, &ctx.id.gateway);
    let why = conn
        .close_reason()
        .map(|e| e.to_string())
        .unwrap_or_default();
    tracing::info!(gateway = %ctx.id.gateway, reason = %why, "gateway disconnected");
}

/// The control stream after Welcome: queue reports from the gateway; the tenant's schema
/// set to it whenever it has another version in force than the registry's.
async fn control(ctx: Arc<Ctx>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let (tx, mut frames) = mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok(f) = quic::read_frame(&mut recv, 1 << 16).await {
            if tx.send(f).await.is_err() {
                break;
            }
        }
    });
    let registry = ctx.sinks.registry.clone();
    let mut wanted = registry.watch(&ctx.id.tenant);
    // What the gateway has in force; `None` until it says (an agent that never does has no
    // registry support and is sent nothing).
    let mut in_force: Option<u64> = None;
    let mut sent: Option<u64> = None;
    loop {
        tokio::select! {
            f = frames.recv() => match f {
                None => return,
                // Then the push check below: after a set that could not be read, each
                // report (every few seconds) tries again.
                Some(Frame::Status(s)) => {
                    ctx.sinks.gateways.reported(&ctx.id.tenant, &ctx.id.gateway, &s);
                }
                Some(Frame::QueueReport(q)) => {
                    ctx.sinks.gateways.reported_queue(&ctx.id.tenant, &ctx.id.gateway, &q);
                }
                Some(Frame::SchemasApplied(a)) => {
                    for r in &a.refused {
                        tracing::warn!(gateway = %ctx.id.gateway, tenant = %ctx.id.tenant, schema = r.id,
                            revision = r.revision, reason = %r.reason, "the gateway refused a payload schema");
                    }
                    tracing::debug!(gateway = %ctx.id.gateway, version = a.version, "gateway schema set in force");
                    in_force = Some(a.version);
                    if let Err(e) = registry.reported(&ctx.id.tenant, &ctx.id.gateway, &a).await {
                        tracing::warn!(gateway = %ctx.id.gateway, error = %format!("{e:#}"), "could not record the gateway's schema set");
                    }
                }
                Some(Frame::Devices(r)) => {
                    match registry.devices(&ctx.id.tenant, &ctx.id.gateway, &r.devices).await {
                        Ok(n) => tracing::debug!(gateway = %ctx.id.gateway, devices = n, "device report kept"),
                        Err(e) => tracing::warn!(gateway = %ctx.id.gateway, error = %format!("{e:#}"),
                            "could not keep the gateway's device report (the next connection sends it again)"),
                    }
                    continue;
                }
                Some(other) => {
                    tracing::debug!(gateway = %ctx.id.gateway, frame = ?other, "ignored on the control stream");
                    continue;
                }
            },
            changed = wanted.changed() => if changed.is_err() { return },
            // A set that could not be read is tried again.
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)), if sent.is_none() && in_force.is_some() => {}
        }
        let want = *wanted.borrow_and_update();
        let Some(have) = in_force else { continue };
        if want == have || sent == Some(want) {
            continue;
        }
        match registry.load(&ctx.id.tenant).await {
            Ok(set) => {
                let version = set.version;
                let n = set.schemas.len();
                if let Err(e) = quic::write_frame(&mut send, &Frame::Schemas(set)).await {
                    tracing::debug!(gateway = %ctx.id.gateway, error = %e, "control stream closed");
                    return;
                }
                tracing::info!(gateway = %ctx.id.gateway, tenant = %ctx.id.tenant, version, schemas = n,
                    "sent the payload schema set");
                sent = Some(version);
            }
            Err(e) => {
                sent = None;
                tracing::warn!(gateway = %ctx.id.gateway, error = %format!("{e:#}"), "could not read the payload schema set; trying again");
            }
        }
    }
}

/// What the acker sends for a batch, in the order the batches came.
enum Reply {
    /// An answer known at once (a rejection).
    Now(Frame),
    /// The answer for a batch once every sink has it.
    Later {
        seq: u64,
        readings: u64,
        postgres: oneshot::Receiver<Outcome>,
        /// Every Kafka delivery the batch waits for.
        kafka: Vec<Deliveries>,
        /// The readings left out of the batch, once kept in `refused_readings`.
        kept: Option<oneshot::Receiver<Result<(), String>>>,
        /// Holds the batch's share of the budget until both are done.
        _ticket: Ticket,
        /// Holds the decoded readings' bytes of the memory budget until both are done.
        _memory: crate::memory::Hold,
    },
}

async fn acker(mut send: quinn::SendStream, mut pending: mpsc::Receiver<Reply>, ctx: Arc<Ctx>) {
    while let Some(reply) = pending.recv().await {
        let frame = match reply {
            Reply::Now(f) => f,
            Reply::Later {
                seq,
                readings,
                postgres,
                kafka,
                kept,
                _ticket,
                _memory,
            } => {
                let stored = match postgres.await {
                    Ok(Ok(conflicts)) => {
                        report_conflicts(&ctx, seq, &conflicts).await;
                        Ok(())
                    }
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err("shutting down; retry".into()),
                };
                let kept = match kept {
                    Some(k) => k
                        .await
                        .unwrap_or_else(|_| Err("shutting down; retry".into())),
                    None => Ok(()),
                };
                let mut delivered = Ok(());
                let sent = !kafka.is_empty();
                for d in kafka {
                    if let Err(e) = d.wait().await {
                        delivered = Err(format!("Kafka did not take the batch: {e}; retry"));
                    }
                }
                if sent && delivered.is_ok() {
                    counter!("plantlink_cloud_readings_written_total", "sink" => "kafka")
                        .increment(readings);
                }
                drop(_ticket);
                if let Some(p) = &ctx.sinks.postgres {
                    p.update_gauge();
                }
                let outcome = stored.and(kept).and(delivered);
                ctx.sinks.gateways.answered(
                    &ctx.id.tenant,
                    &ctx.id.gateway,
                    readings,
                    outcome.is_ok(),
                );
                match outcome {
                    Ok(()) => Frame::Ack(Ack { seq }),
                    Err(why) => {
                        counter!("plantlink_cloud_batches_rejected_total", "reason" => "storage")
                            .increment(1);
                        tracing::error!(gateway = %ctx.id.gateway, seq, %why, "batch not stored");
                        error(ErrorCode::UNAVAILABLE, Some(seq), why)
                    }
                }
            }
        };
        if quic::write_frame(&mut send, &frame).await.is_err() {
            return;
        }
    }
}
/// Counts, logs (one line per batch, with an example) and dead-letters the readings of a
/// batch whose identity was already stored with another value or other tags. They were
/// kept in `reading_conflicts`; the first value stays in `raw_metrics`.
async fn report_conflicts(ctx: &Ctx, seq: u64, conflicts: &[postgres::Conflict]) {
    ctx.sinks
        .gateways
        .conflicting(&ctx.id.tenant, &ctx.id.gateway, conflicts.len() as u64);
    report_conflicts_to(
        ctx.sinks.kafka.as_ref(),
        &ctx.tenant,
        &ctx.gateway,
        Some(seq),
        conflicts,
    )
    .await;
}

/// Counts per tenant, logs (one line, with an example) and dead-letters conflicting readings
/// of `gateway`'s batch `seq` (when known); used by the single-node path and the backbone
/// writer alike.
pub(crate) async fn report_conflicts_to(
    kafka: Option<&Kafka>,
    tenant: &str,
    gateway: &str,
    seq: Option<u64>,
    conflicts: &[postgres::Conflict],
) {
    let Some(first) = conflicts.first() else {
        return;
    };
    let n = conflicts.len() as u64;
    counter!("plantlink_cloud_readings_conflicting_total", "tenant" => tenant.to_string())
        .increment(n);
    tracing::warn!(
        gateway = %gateway, tenant = %tenant, seq, conflicts = n,
        example.device = %first.device.escape_debug(), example.metric = %first.metric.escape_debug(),
        example.ts = %kafka::rfc3339(first.ts_us), example.stored = first.stored, example.received = first.value,
        "readings conflict with stored ones (same device, metric and time, another value); the stored values stay, the others are in reading_conflicts and on the DLQ"
    );
    let Some(k) = kafka else { return };
    for c in conflicts {
        let letter = DeadLetter {
            reason: "conflict",
            detail: format!(
                "{} {} at {} was stored with value {}; this reading has {} (kept in reading_conflicts)",
                c.device.escape_debug(),
                c.metric.escape_debug(),
                kafka::rfc3339(c.ts_us),
                c.stored,
                c.value
            ),
            tenant,
            gateway,
            seq,
            reading: Some(serde_json::json!({
                "tenant": c.tenant,
                "device_id": c.device,
                "metric": c.metric,
                "ts": kafka::rfc3339(c.ts_us),
                "ts_us": c.ts_us,
                "value": kafka::json_number(c.value),
                "stored_value": kafka::json_number(c.stored),
            })),
            payload_hex: None,
            payload_bytes: None,
        };
        k.send_dlq(gateway, &letter).await;
    }
}

/// Why a single reading is left out of its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Outside years 1 to 9999: no database can hold it.
    TimestampOutOfRange,
    /// A NUL character in the device, the metric or a tag: PostgreSQL text cannot hold it.
    NulCharacter,
    /// Older than the window (`ingest.max_past_days`).
    TooOld,
    /// Further ahead of the cloud's clock than the window (`ingest.max_future_secs`).
    InFuture,
}

impl Refusal {
    /// The `reason` label of the counter and of the DLQ record.
    pub fn reason(self) -> &'static str {
        match self {
            Self::TimestampOutOfRange => "timestamp_out_of_range",
            Self::NulCharacter => "nul_character",
            Self::TooOld => "too_old",
            Self::InFuture => "in_future",
        }
    }
}

/// Whether the cloud takes a reading that arrived at `now_us` (the cloud's clock, µs since
/// the epoch): its event time must be within `window` of `now_us`, edges included.
pub fn verdict(r: &Reading, window: &Window, now_us: i64) -> Result<(), Refusal> {
    if !maintain::storable(r.ts.0) {
        return Err(Refusal::TimestampOutOfRange);
    }
    let nul = |s: &str| s.contains('\0');
    if nul(&r.device) || nul(&r.metric) || r.tags.iter().any(|(k, v)| nul(k) || nul(v)) {
        return Err(Refusal::NulCharacter);
    }
    if r.ts.0 < now_us.saturating_sub(window.past_us) {
        return Err(Refusal::TooOld);
    }
    if r.ts.0 > now_us.saturating_add(window.future_us) {
        return Err(Refusal::InFuture);
    }
    Ok(())
}

/// What the DLQ record of a refused reading says, for a human.
fn refusal_detail(r: &Reading, why: Refusal, window: &Window, now_us: i64, seq: u64) -> String {
    let device = r.device.escape_debug();
    match why {
        Refusal::TooOld | Refusal::InFuture => format!(
            "reading of {device} at {} is outside the accepted window ({} days back to {} s \
             ahead of the cloud's clock, {} on arrival); left out of batch {seq}",
            kafka::rfc3339(r.ts.0),
            window.past_us / 86_400_000_000,
            window.future_us / 1_000_000,
            kafka::rfc3339(now_us),
        ),
        _ => format!("reading of {device} left out of batch {seq}"),
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
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
    ctx: Arc<Ctx>,
    max_frame: usize,
) {
    let id = &ctx.id;
    let limits = Limits {
        max_payload_bytes: max_frame,
        ..Limits::default()
    };
    let mut decoder = Some(BatchDecoder::new(limits));
    let memory = &ctx.sinks.memory;
    loop {
        // The frame's length first: its bytes are reserved before the body is read.
        let read = match quic::read_prefix(&mut recv, max_frame + 1024).await {
            Ok(total) => match memory.reserve(&ctx.tenant, &ctx.gateway, total).await {
                Some(hold) => quic::read_body(&mut recv, total, max_frame + 1024)
                    .await
                    .map(|f| (f, hold)),
                None => return,
            },
            Err(e) => Err(e),
        };
        let (frame, mut hold) = match read {
            Ok(f) => f,
            Err(quic::ReadError::Ended(_)) => return,
            Err(quic::ReadError::Protocol(e)) => {
                counter!("plantlink_cloud_batches_rejected_total", "reason" => "protocol")
                    .increment(1);
                tracing::warn!(gateway = %id.gateway, error = %e, "unreadable frame; closing the stream");
                dead_letter(&ctx, "protocol", e.clone(), None, None).await;
                let _ = replies
                    .send(Reply::Now(error(ErrorCode::PROTOCOL, None, e)))
                    .await;
                return;
            }
        };
        let Frame::Batch(b) = frame else {
            counter!("plantlink_cloud_batches_rejected_total", "reason" => "protocol").increment(1);
            let why = "expected a Batch frame".to_owned();
            dead_letter(&ctx, "protocol", why.clone(), None, None).await;
            if replies
                .send(Reply::Now(error(ErrorCode::PROTOCOL, None, why)))
                .await
                .is_err()
            {
                return;
            }
            continue;
        };
        // Then its worst case while decoding, which the decoder's limits bound, with no
        // more readings than the frame says.
        let body = plantlink_wire::batch::declared_body_len(&b.payload).unwrap_or(0);
        let worst = crate::memory::worst_case(b.readings as usize, body, &limits);
        let mut payload = b.payload;
        let decoded = if worst > memory.share() {
            // Never reserved at less than its worst case: such a batch is refused whole, and
            // the agent splits it.
            Err(DecodeError::TooLarge {
                what: "bytes this batch may take once decoded (ingest.max_buffered_mib / 4 per gateway)",
                found: worst as u64,
                limit: memory.share() as u64,
            })
        } else {
            if worst > hold.bytes() {
                // Given back first and taken again whole: a stream never waits while holding
                // part of what it needs, so two streams of a gateway cannot wait on each
                // other. (The frame, read already, is unaccounted while it waits.)
                drop(hold);
                hold = match memory.reserve(&ctx.tenant, &ctx.gateway, worst).await {
                    Some(h) => h,
                    None => return,
                };
            }
            // Decoding is CPU work: off the async workers.
            let mut dec = decoder.take().unwrap_or_else(|| BatchDecoder::new(limits));
            dec.limits_mut().max_readings = (b.readings as usize).min(limits.max_readings);
            let Ok((dec, decoded, back)) = tokio::task::spawn_blocking(move || {
                let r = dec.decode(&payload);
                (dec, r, payload)
            })
            .await
            else {
                return; // the runtime is shutting down
            };
            decoder = Some(dec);
            payload = back;
            decoded
        };
        let (reason, code, why) = match decoded {
            Ok(readings) if readings.len() == b.readings as usize => {
                let backfill = b.lane == Lane::Backlog;
                drop(payload);
                hold.shrink_to(crate::memory::decoded_size(&readings));
                if !accept(&ctx, &replies, b.seq, backfill, readings, hold).await {
                    return;
                }
                continue;
            }
            Ok(r) => (
                "malformed",
                ErrorCode::MALFORMED,
                format!(
                    "batch {} says {} readings but holds {}",
                    b.seq,
                    b.readings,
                    r.len()
                ),
            ),
            Err(e) => {
                let (reason, code) = reject_reason(&e);
                (reason, code, e.to_string())
            }
        };
        counter!("plantlink_cloud_batches_rejected_total", "reason" => reason).increment(1);
        tracing::warn!(gateway = %id.gateway, tenant = %id.tenant, seq = b.seq, %why, "batch rejected");
        dead_letter(&ctx, reason, why.clone(), Some(b.seq), Some(&payload)).await;
        if replies
            .send(Reply::Now(error(code, Some(b.seq), why)))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Hands a decoded batch to the sinks: its share of the budget first (waiting here is what
/// pushes back on the gateway), then Kafka (enqueued in stream order), then PostgreSQL.
/// False when the stream is gone.
async fn accept(
    ctx: &Ctx,
    replies: &mpsc::Sender<Reply>,
    seq: u64,
    backfill: bool,
    mut readings: Vec<Reading>,
    hold: crate::memory::Hold,
) -> bool {
    counter!("plantlink_cloud_readings_received_total").increment(readings.len() as u64);
    let now = now_us();
    let mut refused = Vec::new();
    readings.retain(|r| match verdict(r, &ctx.window, now) {
        Ok(()) => true,
        Err(why) => {
            refused.push((why, r.clone()));
            false
        }
    });
    refuse(ctx, seq, now, &refused).await;
    let refused: Vec<(Reading, &'static str)> = refused
        .into_iter()
        .map(|(why, r)| (r, why.reason()))
        .collect();
    let (Some(postgres), None) = (&ctx.sinks.postgres, &ctx.sinks.backbone) else {
        return to_backbone(ctx, replies, seq, backfill, readings, refused, hold).await;
    };
    // Kept in PostgreSQL too (Kafka may be off): the batch is acknowledged only once they are.
    let kept = (!refused.is_empty())
        .then(|| postgres.keep_refused(ctx.tenant.clone(), ctx.gateway.clone(), refused));
    if let Some(a) = ctx
        .sinks
        .alerts
        .as_ref()
        .filter(|a| !readings.is_empty() && a.watches(&ctx.tenant))
    {
        a.feed(Feed {
            tenant: ctx.tenant.clone(),
            readings: readings.clone(),
            backfill,
        })
        .await;
    }
    let Some(ticket) = postgres.reserve(readings.len()).await else {
        return false;
    };
    let kafka = match &ctx.sinks.kafka {
        Some(k) => vec![k.send_readings(&ctx.tenant, &ctx.gateway, &readings).await],
        None => Vec::new(),
    };
    let n = readings.len() as u64;
    ctx.sinks.gateways.received(&ctx.tenant, &ctx.gateway, n);
    let postgres = postgres
        .submit_reserved(
            Batch {
                tenant: ctx.tenant.clone(),
                gateway: ctx.gateway.clone(),
                readings,
            },
            ticket.clone(),
        )
        .await;
    replies
        .send(Reply::Later {
            seq,
            readings: n,
            postgres,
            kafka,
            kept,
            _ticket: ticket,
            _memory: hold,
        })
        .await
        .is_ok()
}

/// The scale-out receiver's [`accept`]: the batch (its refused readings too, for the writer
/// to keep) goes to the backbone topic, and to the public readings topic unless that is off;
/// it is acknowledged once Kafka has every record.
async fn to_backbone(
    ctx: &Ctx,
    replies: &mpsc::Sender<Reply>,
    seq: u64,
    backfill: bool,
    readings: Vec<Reading>,
    refused: Vec<(Reading, &'static str)>,
    hold: crate::memory::Hold,
) -> bool {
    let (Some(k), Some((budget, max))) = (&ctx.sinks.kafka, &ctx.sinks.backbone) else {
        unreachable!("the scale-out mode has Kafka (Roles::check)");
    };
    let want = (readings.len() + refused.len()).clamp(1, *max) as u32;
    let Ok(permit) = budget.clone().acquire_many_owned(want).await else {
        return false;
    };
    let origin = crate::backbone::Origin {
        tenant: &ctx.tenant,
        gateway: &ctx.gateway,
        seq,
        backfill,
    };
    let mut deliveries = vec![k.send_backbone(&origin, &readings, &refused).await];
    if k.config().public_readings && !readings.is_empty() {
        deliveries.push(k.send_readings(&ctx.tenant, &ctx.gateway, &readings).await);
    }
    let n = readings.len() as u64;
    ctx.sinks.gateways.received(&ctx.tenant, &ctx.gateway, n);
    let (done, postgres) = oneshot::channel();
    let _ = done.send(Ok(Vec::new()));
    replies
        .send(Reply::Later {
            seq,
            readings: n,
            postgres,
            kafka: deliveries,
            kept: None,
            _ticket: Ticket::from_permit(permit),
            _memory: hold,
        })
        .await
        .is_ok()
}

/// Counts the readings [`verdict`] refused per tenant and reason, logs them in one line
/// (with an example), and puts each on the DLQ when Kafka is on.
async fn refuse(ctx: &Ctx, seq: u64, now: i64, refused: &[(Refusal, Reading)]) {
    let Some((first_why, first)) = refused.first() else {
        return;
    };
    let mut by_reason: Vec<(&'static str, u64)> = Vec::new();
    for (why, _) in refused {
        match by_reason.iter_mut().find(|(r, _)| *r == why.reason()) {
            Some((_, n)) => *n += 1,
            None => by_reason.push((why.reason(), 1)),
        }
    }
    for (reason, n) in &by_reason {
        counter!("plantlink_cloud_readings_rejected_total", "tenant" => ctx.tenant.to_string(), "reason" => *reason)
            .increment(*n);
    }
    let counts = by_reason
        .iter()
        .map(|(r, n)| format!("{r}={n}"))
        .collect::<Vec<_>>()
        .join(" ");
    tracing::warn!(
        gateway = %ctx.id.gateway, tenant = %ctx.tenant, seq, refused = refused.len(), %counts,
        example.reason = first_why.reason(), example.device = %first.device.escape_debug(),
        example.metric = %first.metric.escape_debug(), example.ts_us = first.ts.0,
        now_us = now, "readings left out of their batch (on the DLQ; the rest is stored and acknowledged)"
    );
    let Some(k) = &ctx.sinks.kafka else { return };
    for (why, r) in refused {
        let reading =
            serde_json::from_slice(&kafka::record_json(&ctx.tenant, &ctx.gateway, r)).ok();
        let letter = DeadLetter {
            reason: why.reason(),
            detail: refusal_detail(r, *why, &ctx.window, now, seq),
            tenant: &ctx.tenant,
            gateway: &ctx.gateway,
            seq: Some(seq),
            reading,
            payload_hex: None,
            payload_bytes: None,
        };
        k.send_dlq(&ctx.gateway, &letter).await;
    }
}

/// Sends what the cloud refused to the dead-letter topic, when Kafka is on.
async fn dead_letter(
    ctx: &Ctx,
    reason: &str,
    detail: String,
    seq: Option<u64>,
    payload: Option<&[u8]>,
) {
    let Some(k) = &ctx.sinks.kafka else { return };
    let letter = DeadLetter {
        reason,
        detail,
        tenant: &ctx.tenant,
        gateway: &ctx.gateway,
        seq,
        reading: None,
        payload_hex: payload.map(kafka::hex_prefix),
        payload_bytes: payload.map(<[u8]>::len),
    };
    k.send_dlq(&ctx.gateway, &letter).await;
}

fn error(code: ErrorCode, seq: Option<u64>, reason: String) -> Frame {
    Frame::Error(ErrorFrame { code, seq, reason })
}

#[cfg(test)]
mod tests {
    use super::*;
    use plantlink_model::Timestamp;

    const NOW: i64 = 1_795_000_000_000_000; // 2026-11-18
    const W: Window = Window {
        past_us: 7 * 86_400_000_000,
        future_us: 3_600_000_000,
    };

    fn at(ts_us: i64) -> Reading {
        Reading::new("acme", "pump-1", "temperature", Timestamp(ts_us), 1.0)
    }

    #[test]
    fn the_window_edges_are_inside() {
        assert_eq!(verdict(&at(NOW), &W, NOW), Ok(()));
        assert_eq!(verdict(&at(NOW - W.past_us), &W, NOW), Ok(()));
        assert_eq!(verdict(&at(NOW + W.future_us), &W, NOW), Ok(()));
        assert_eq!(
            verdict(&at(NOW - W.past_us - 1), &W, NOW),
            Err(Refusal::TooOld)
        );
        assert_eq!(
            verdict(&at(NOW + W.future_us + 1), &W, NOW),
            Err(Refusal::InFuture)
        );
        assert_eq!(
            verdict(&at(NOW + 10 * 86_400_000_000), &W, NOW),
            Err(Refusal::InFuture)
        );
        assert_eq!(verdict(&at(0), &W, NOW), Err(Refusal::TooOld));
    }

    #[test]
    fn what_no_database_can_hold_is_named_first() {
        assert_eq!(
            verdict(&at(i64::MAX), &W, NOW),
            Err(Refusal::TimestampOutOfRange)
        );
        assert_eq!(
            verdict(&at(i64::MIN), &W, NOW),
            Err(Refusal::TimestampOutOfRange)
        );
        let mut r = at(NOW);
        r.device = "pump\0".into();
        assert_eq!(verdict(&r, &W, NOW), Err(Refusal::NulCharacter));
        let mut r = at(NOW - W.past_us - 1);
        r.tags.insert("line\0".into(), "l3".into());
        assert_eq!(verdict(&r, &W, NOW), Err(Refusal::NulCharacter));
        let mut r = at(NOW);
        r.metric = "t\0".into();
        assert_eq!(
            verdict(&r, &W, NOW).map_err(Refusal::reason),
            Err("nul_character")
        );
    }

    #[test]
    fn the_clock_edges_do_not_overflow() {
        let wide = Window {
            past_us: i64::MAX,
            future_us: i64::MAX,
        };
        assert_eq!(verdict(&at(NOW), &wide, i64::MAX), Ok(()));
        assert_eq!(verdict(&at(-2), &wide, i64::MIN), Ok(()));
        assert_eq!(
            [
                Refusal::TimestampOutOfRange,
                Refusal::NulCharacter,
                Refusal::TooOld,
                Refusal::InFuture
            ]
            .map(Refusal::reason),
            [
                "timestamp_out_of_range",
                "nul_character",
                "too_old",
                "in_future"
            ]
        );
    }
}
