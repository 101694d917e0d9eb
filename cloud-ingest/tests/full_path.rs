//! The full path on one machine: readings published to a real Mosquitto are collected by the
//! edge agent (real SQLite), shipped over QUIC with mutual TLS to cloud-ingest, and land in
//! a real PostgreSQL exactly once. `PLANTLINK_FULL_PATH_MESSAGES` scales it (default 50000 messages, 100,000 readings).
#![allow(clippy::unwrap_used)] // tests may panic

mod common;

use common::full_path::full_path;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_readings_reach_postgres_exactly_once() {
    let n: i64 = std::env::var("PLANTLINK_FULL_PATH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    full_path(n, None, "full").await;
}

/// R5: the same over a link that drops 5% of the UDP packets each way and reorders others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossy_reordering_link_loses_nothing_and_does_not_stall() {
    full_path(10_000, Some(0.05), "lossy").await;
}
