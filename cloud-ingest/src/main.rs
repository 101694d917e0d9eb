//! The `cloud-ingest` command line.
#![forbid(unsafe_code)]

use clap::Parser;

/// Plantlink cloud ingest: receives batches from edge agents.
///
/// It accepts gateways that present a certificate from the fleet CA over QUIC, and fans
/// every batch out to Kafka, to stream alerting and to TimescaleDB or PostgreSQL with
/// hourly and daily rollups. It acknowledges a batch only when every sink has it, and
/// serves a query API over what it stored.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
