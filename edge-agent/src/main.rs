//! The `edge-agent` command line.
#![forbid(unsafe_code)]

use clap::Parser;

/// Plantlink edge agent: runs on a plant gateway.
///
/// It collects readings from the plant's MQTT broker and from CoAP devices, decodes the
/// payloads of each firmware version, drops duplicates and floods, keeps every reading
/// durably in a SQLite queue, and ships compressed batches to cloud-ingest over QUIC with
/// mutual TLS. A reading is acknowledged to its device only after it is on disk, and is
/// deleted from disk only after the cloud has acknowledged it.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
