//! The Prometheus endpoint and the service's metrics, registered at zero so that dashboards
//! and alerts see every series before the first event.

use std::net::SocketAddr;

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::PrometheusBuilder;

/// Serves `/metrics` on `bind` (inside a tokio runtime) and registers the metrics.
pub fn install(bind: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(bind)
        .install()
        .map_err(|e| anyhow::anyhow!("metrics.bind = {bind}: cannot serve /metrics: {e}"))?;
    describe();
    Ok(())
}

/// Describes every metric and sets the unlabelled ones (and the known labels) to zero.
pub fn describe() {
    let counters = [
        (
            "plantlink_cloud_readings_received_total",
            "Readings decoded from gateways' batches.",
        ),
        (
            "plantlink_cloud_readings_written_total",
            "Readings newly stored, by sink (replays are not counted).",
        ),
        (
            "plantlink_cloud_readings_replayed_total",
            "Readings not stored because the same identity was stored with the same value and tags.",
        ),
        (
            "plantlink_cloud_readings_conflicting_total",
            "Readings whose identity was stored with another value or other tags, by tenant \
             (kept in reading_conflicts and on the DLQ; the first value stays).",
        ),
        (
            "plantlink_cloud_rollup_marks_skipped_total",
            "Rollup marks dropped unrolled because their bucket is older than the raw retention \
             (the rollup keeps what it had).",
        ),
        (
            "plantlink_cloud_timescale_job_failures_total",
            "Failed runs of each TimescaleDB policy job, as TimescaleDB counts them.",
        ),
        (
            "plantlink_cloud_batches_rejected_total",
            "Batches answered with an error, by reason.",
        ),
        (
            "plantlink_cloud_readings_rejected_total",
            "Readings left out of their batch (on the DLQ; the batch is acknowledged), by tenant and \
             reason: no database can hold them (timestamp_out_of_range, nul_character) or their \
             event time is outside [ingest]'s window (too_old, in_future).",
        ),
        (
            "plantlink_cloud_handshakes_refused_total",
            "Connections refused at the TLS handshake (unknown CA, expired, revoked).",
        ),
        (
            "plantlink_cloud_flushes_total",
            "Write transactions committed or refused.",
        ),
        (
            "plantlink_cloud_write_retries_total",
            "Writes retried after a failure that may pass (connection, restart, deadlock).",
        ),
        (
            "plantlink_cloud_rollup_buckets_total",
            "Hourly rollup buckets re-rolled on plain PostgreSQL.",
        ),
        (
            "plantlink_cloud_alerts_total",
            "Alert transitions, by severity and state (firing, resolved).",
        ),
        (
            "plantlink_cloud_late_readings_total",
            "Readings too late for their alert window (stored, not re-alerted).",
        ),
        (
            "plantlink_cloud_webhook_failures_total",
            "Webhook deliveries that failed, by reason (delivery, gave_up, queue_full).",
        ),
    ];
    for (name, help) in counters {
        describe_counter!(name, Unit::Count, help);
    }
    for severity in ["critical", "warning", "info"] {
        for state in ["firing", "resolved"] {
            counter!("plantlink_cloud_alerts_total", "severity" => severity, "state" => state)
                .increment(0);
        }
    }
    describe_gauge!(
        "plantlink_cloud_alert_eval_lag_seconds",
        Unit::Seconds,
        "Processing time minus the newest event time of the last live batch evaluated."
    );
    gauge!("plantlink_cloud_alert_eval_lag_seconds").set(0.0);
    describe_gauge!(
        "plantlink_cloud_alert_series",
        Unit::Count,
        "(rule, device) series the alerting engine tracks."
    );
    for name in [
        "plantlink_cloud_late_readings_total",
        "plantlink_cloud_readings_received_total",
        "plantlink_cloud_handshakes_refused_total",
        "plantlink_cloud_flushes_total",
        "plantlink_cloud_write_retries_total",
        "plantlink_cloud_rollup_buckets_total",
        "plantlink_cloud_readings_replayed_total",
        "plantlink_cloud_rollup_marks_skipped_total",
    ] {
        counter!(name).increment(0);
    }
    counter!("plantlink_cloud_readings_written_total", "sink" => "postgres").increment(0);
    for reason in [
        "malformed",
        "unsupported_version",
        "too_large",
        "protocol",
        "storage",
    ] {
        counter!("plantlink_cloud_batches_rejected_total", "reason" => reason).increment(0);
    }
    describe_gauge!(
        "plantlink_cloud_timescale_job_last_success_age_seconds",
        Unit::Seconds,
        "Seconds since each TimescaleDB policy job last succeeded (-1: never)."
    );
    describe_gauge!(
        "plantlink_cloud_connections",
        Unit::Count,
        "Gateways connected."
    );
    gauge!("plantlink_cloud_connections").set(0.0);
    describe_gauge!(
        "plantlink_cloud_pending_readings",
        Unit::Count,
        "Readings received and not yet committed (bounded by postgres.max_pending_readings)."
    );
    gauge!("plantlink_cloud_pending_readings").set(0.0);
    describe_histogram!(
        "plantlink_cloud_flush_seconds",
        Unit::Seconds,
        "Time to write one transaction of merged batches."
    );
}
