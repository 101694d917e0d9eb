//! Logging, and the Prometheus metrics (served with the status page, [`crate::status`]).

use std::net::SocketAddr;

use metrics::{Unit, counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::PrometheusBuilder;

/// Logs to stderr; `RUST_LOG` filters (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Serves `/metrics`, and the status page at `/` when `status` says which queue to read,
/// on `bind` (inside a tokio runtime); registers every metric at zero, so that dashboards see
/// them before the first event.
pub async fn install_metrics(
    bind: SocketAddr,
    status: Option<crate::status::Source>,
) -> anyhow::Result<()> {
    let listener = crate::status::bind(bind).await?;
    let handle = PrometheusBuilder::new().install_recorder().map_err(|e| {
        anyhow::anyhow!("metrics.bind = {bind}: cannot install the metrics recorder: {e}")
    })?;
    describe();
    tokio::spawn(crate::status::serve(listener, handle, status));
    Ok(())
}

fn describe() {
    let counters = [
        (
            "plantlink_edge_readings_received_total",
            "Readings decoded from devices, by source.",
        ),
        (
            "plantlink_edge_readings_stored_total",
            "Readings committed to the queue.",
        ),
        (
            "plantlink_edge_duplicates_dropped_total",
            "Readings dropped as replays of stored ones (same identity, value and tags).",
        ),
        (
            "plantlink_edge_rate_limited_total",
            "Readings dropped by the per-device rate limit.",
        ),
        (
            "plantlink_edge_dead_letters_total",
            "Refused payloads or fields, by reason.",
        ),
        (
            "plantlink_edge_evicted_total",
            "Readings evicted because the queue was full.",
        ),
        (
            "plantlink_edge_mqtt_redeliveries_total",
            "MQTT redeliveries of already committed messages.",
        ),
        (
            "plantlink_edge_mqtt_reconnects_total",
            "MQTT connections lost.",
        ),
        (
            "plantlink_edge_coap_duplicates_total",
            "CoAP retransmissions answered from the cache.",
        ),
        (
            "plantlink_edge_coap_malformed_total",
            "UDP datagrams that were not CoAP.",
        ),
        (
            "plantlink_edge_commits_total",
            "Queue transactions committed.",
        ),
        (
            "plantlink_edge_commit_failures_total",
            "Queue commits that failed and were retried.",
        ),
        (
            "plantlink_edge_readings_acked_total",
            "Readings the cloud acknowledged (and the queue then deleted).",
        ),
        (
            "plantlink_edge_batches_acked_total",
            "Batches the cloud acknowledged.",
        ),
        (
            "plantlink_edge_batches_refused_total",
            "Batches the cloud refused (or too large to send), by reason; each is split or quarantined.",
        ),
        (
            "plantlink_edge_quarantined_total",
            "Readings the cloud refused on their own, moved to the quarantine, by reason.",
        ),
        (
            "plantlink_edge_uplink_reconnects_total",
            "Uplink connections lost or refused.",
        ),
        (
            "plantlink_edge_uplink_bytes_sent_total",
            "UDP payload bytes sent to the cloud, QUIC and TLS included.",
        ),
    ];
    for (name, help) in counters {
        describe_counter!(name, Unit::Count, help);
    }
    for src in ["mqtt", "coap"] {
        counter!("plantlink_edge_readings_received_total", "source" => src).increment(0);
    }
    for (name, _) in counters.iter().filter(|(n, _)| {
        !matches!(
            *n,
            "plantlink_edge_readings_received_total"
                | "plantlink_edge_dead_letters_total"
                | "plantlink_edge_batches_refused_total"
                | "plantlink_edge_quarantined_total"
        )
    }) {
        counter!(*name).increment(0);
    }
    for reason in crate::payload::Reason::ALL.map(crate::payload::Reason::as_str) {
        counter!("plantlink_edge_dead_letters_total", "reason" => reason).increment(0);
    }
    for reason in ["malformed", "too_large"] {
        counter!("plantlink_edge_batches_refused_total", "reason" => reason).increment(0);
        counter!("plantlink_edge_quarantined_total", "reason" => reason).increment(0);
    }
    for g in [
        "plantlink_edge_queue_readings",
        "plantlink_edge_queue_bytes",
        "plantlink_edge_queue_oldest_age_seconds",
    ] {
        gauge!(g).set(0.0);
    }
    describe_gauge!(
        "plantlink_edge_queue_readings",
        Unit::Count,
        "Readings waiting in the queue."
    );
    describe_gauge!(
        "plantlink_edge_queue_bytes",
        Unit::Bytes,
        "Bytes accounted to queued readings."
    );
    describe_gauge!(
        "plantlink_edge_queue_oldest_age_seconds",
        Unit::Seconds,
        "Age of the oldest queued reading's timestamp."
    );
    describe_gauge!(
        "plantlink_edge_mqtt_connected",
        "1 while connected to the plant broker."
    );
    gauge!("plantlink_edge_mqtt_connected").set(0.0);
    describe_gauge!(
        "plantlink_edge_uplink_connected",
        "1 while connected to cloud-ingest."
    );
    gauge!("plantlink_edge_uplink_connected").set(0.0);
}
