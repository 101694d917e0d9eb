//! `edge-agent run`: wires the queue, the writer, the sources and the metrics endpoint, and
//! stops cleanly on SIGTERM or Ctrl-C.

use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::ingest::{Requests, UplinkRequest, WriterOptions, spawn_writer};
use crate::payload::Decoder;
use crate::ratelimit::RateLimiter;
use crate::sdnotify::Notifier;
use crate::store::{Options, Store};
use crate::{coap, mqtt, telemetry};

/// Messages waiting for the writer; beyond this, sources wait (backpressure).
const INTAKE_CAPACITY: usize = 8192;

/// Runs the agent until a shutdown signal, then drains and returns.
pub async fn run(config: Config) -> anyhow::Result<()> {
    run_until(config, shutdown_signal()).await
}

/// Runs the agent until `stop` completes.
pub async fn run_until(
    config: Config,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let opts = Options::from_config(&config);
    if let Some(m) = &config.metrics {
        let source = crate::status::Source {
            queue: opts.path.clone(),
            gateway: config.gateway.id.clone(),
            max_bytes: opts.max_bytes,
        };
        telemetry::install_metrics(m.bind, Some(source)).await?;
        tracing::info!(bind = %m.bind, "status page at / and Prometheus metrics at /metrics");
    }
    if let Some(dir) = opts.path.parent().filter(|d| !d.as_os_str().is_empty()) {
        anyhow::ensure!(
            dir.is_dir(),
            "store.path = {}: folder {} does not exist; create it (the systemd unit's StateDirectory does)",
            opts.path.display(),
            dir.display()
        );
    }
    let store = tokio::task::spawn_blocking(move || Store::open(opts))
        .await?
        .context("opening the queue")?;
    tracing::info!(path = %store.path().display(), readings = store.len(),
        capacity = store.capacity(), "queue open");

    let (tx, rx) = mpsc::channel(INTAKE_CAPACITY);
    let (requests_tx, requests_rx) = mpsc::unbounded_channel();
    let requests = Requests::new(requests_tx, tx.clone());
    let (confirmed_tx, confirmed_rx) = mpsc::unbounded_channel();
    let (publish_tx, publish_rx) = mpsc::unbounded_channel();
    let mut decoder = Decoder::new(&config);
    match store.schema_set() {
        Ok(Some((version, entries))) => {
            let registry = crate::schemas::Registry::compile(version, entries);
            tracing::info!(
                version,
                schemas = registry.entries.len(),
                "decoding with the stored payload schema set"
            );
            metrics::gauge!("plantlink_edge_schema_set_version").set(version as f64);
            decoder.set_registry(registry);
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %e, "the stored payload schema set is unreadable; waiting for the cloud's")
        }
    }
    let writer = spawn_writer(
        store,
        decoder,
        RateLimiter::new(config.limits.per_device_per_sec, config.limits.burst),
        rx,
        requests_rx,
        confirmed_rx,
        WriterOptions {
            commit_interval: Duration::from_millis(config.store.commit_interval_ms),
            devices: config.devices.clone(),
            publish: Some(publish_tx),
        },
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(c) = &config.coap {
        let socket = tokio::net::UdpSocket::bind(c.bind)
            .await
            .with_context(|| format!("coap.bind = {}: cannot listen", c.bind))?;
        tracing::info!(bind = %c.bind, "CoAP listening");
        tasks.spawn(coap::serve(socket, tx.clone(), stop_rx.clone()));
    }
    if let Some(m) = config.mqtt.clone() {
        tasks.spawn(mqtt::run(
            m,
            config.limits.max_payload_bytes,
            tx.clone(),
            confirmed_tx,
            publish_rx,
            stop_rx.clone(),
        ));
    }
    if let Some(u) = config.uplink.clone() {
        crate::status::uplink_configured(&u.server);
        tasks.spawn(crate::uplink::driver::run(
            u,
            config.gateway.id.clone(),
            requests.clone(),
            stop_rx.clone(),
        ));
    } else {
        tracing::info!("no [uplink]: collecting and storing only");
    }
    // The writer looks for dead letters marked for replay when it wakes; wake it now and
    // then when nothing arrives.
    {
        let tx = tx.clone();
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => { let _ = tx.try_send(crate::ingest::Command::Wake); }
                    _ = stop.changed() => return Ok(()),
                }
            }
        });
    }
    let systemd = Notifier::from_env().map(std::sync::Arc::new);
    if let Some(n) = &systemd {
        n.notify("READY=1\nSTATUS=collecting");
        if let Some(every) = n.watchdog() {
            tasks.spawn(watchdog(
                n.clone(),
                every,
                requests.clone(),
                stop_rx.clone(),
            ));
        }
    }
    drop((tx, requests));
    if config.mqtt.is_none() && config.coap.is_none() {
        tracing::warn!("neither [mqtt] nor [coap] is configured: nothing will be collected");
    }

    let mut failure = None;
    tokio::select! {
        _ = stop => tracing::info!("shutting down: committing and acknowledging what was received"),
        Some(done) = tasks.join_next() => {
            failure = match done {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(e) => Some(e.into()),
            };
        }
    }
    if let Some(n) = &systemd {
        n.notify("STOPPING=1\nSTATUS=committing and acknowledging what was received");
    }
    let _ = stop_tx.send(true);
    while let Some(done) = tasks.join_next().await {
        if let Ok(Err(e)) = done {
            failure.get_or_insert(e);
        }
    }
    let store = tokio::task::spawn_blocking(move || writer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the queue writer panicked"))?;
    tracing::info!(readings = store.len(), "stopped; queue closed");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Pings systemd's watchdog every `every` (half of `WatchdogSec=`), each time after the queue
/// writer has answered a request within `every / 2`: a writer that stops answering (a hung
/// disk, a deadlock) stops the pings, and systemd restarts the agent. Pings are at most
/// 1.5 x `every` apart while the writer answers, safely inside `WatchdogSec=`. The ping carries
/// the queue depth as the unit's status line (`systemctl status`).
async fn watchdog(
    systemd: std::sync::Arc<Notifier>,
    every: Duration,
    queue: Requests,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return Ok(()),
        }
        let asked = queue.ask(UplinkRequest::View);
        let answered = tokio::select! {
            a = tokio::time::timeout(every / 2, asked) => a,
            _ = stop.changed() => return Ok(()),
        };
        match answered {
            Ok(Some(view)) => systemd.notify(&format!(
                "WATCHDOG=1\nSTATUS=collecting; {} readings queued",
                view.queued
            )),
            Ok(None) => return Ok(()),
            Err(_) => tracing::warn!(
                waited_ms = (every / 2).as_millis() as u64,
                "the queue writer did not answer in time; not pinging the systemd watchdog"
            ),
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::QueueView;
    use std::os::unix::net::UnixDatagram;

    #[tokio::test]
    async fn the_watchdog_is_pinged_only_after_the_writer_answers() {
        let dir = std::env::temp_dir().join(format!("plantlink-watchdog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap();
        let every = Duration::from_millis(200);
        let systemd = std::sync::Arc::new(Notifier::open(path.as_os_str(), Some(every)).unwrap());
        let (wake, _intake) = mpsc::channel(4);
        let (inbox, mut writer) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(watchdog(
            systemd,
            every,
            Requests::new(inbox, wake),
            stop_rx,
        ));
        let mut ask = async || match writer.recv().await {
            Some(UplinkRequest::View(reply)) => reply,
            other => panic!("the watchdog sent {other:?}"),
        };

        // The writer hears the first request but does not answer it; the second request comes
        // a tick later, after the first one's deadline: no ping may have been sent.
        let _unanswered = ask().await;
        let reply = ask().await;
        sock.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 256];
        assert!(
            sock.recv(&mut buf).is_err(),
            "pinged while the writer did not answer"
        );

        // Answered: one ping, with the queue depth.
        reply
            .send(QueueView {
                queued: 5,
                ..QueueView::default()
            })
            .unwrap();
        sock.set_nonblocking(false).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let n = tokio::task::spawn_blocking(move || {
            let n = sock.recv(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        })
        .await
        .unwrap();
        assert_eq!(n, "WATCHDOG=1\nSTATUS=collecting; 5 readings queued");

        stop_tx.send(true).unwrap();
        task.await.unwrap().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
