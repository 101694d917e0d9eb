//! The `firmware-sim` command line.
#![forbid(unsafe_code)]

use anyhow::Result;
use clap::{Parser, Subcommand};
use firmware_sim::{bench_codec, refdata};
use serde_json::json;

/// Simulates Plantlink sensor fleets and measures the pipeline.
///
/// Today it generates the reference dataset and benchmarks the batch codec on it; fleet
/// simulation over MQTT and CoAP and the delivery verifier come with later releases.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Bytes per reading and encode/decode speed of the batch codec on the reference
    /// dataset (500 devices x 4 metrics x 10 min at 1 Hz), against zstd -3 over the same
    /// readings as JSON lines.
    ///
    /// Example: firmware-sim bench-codec --batch 10000 --json
    BenchCodec {
        /// Seed of the reference dataset; the same seed gives the same readings.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Readings per batch. Repeat to measure several sizes; default 1000 and 10000.
        #[arg(long = "batch", value_name = "N")]
        batches: Vec<usize>,
        /// Timed passes over the dataset per size; the median is reported.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=100))]
        rounds: u64,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Publishes each line of standard input as one MQTT message and waits until the
    /// broker has acknowledged all of them.
    ///
    /// Example: seq 1 1000 | firmware-sim publish --mqtt mqtt://127.0.0.1:1883 --topic plant/p1/d1/temperature
    Publish {
        /// The broker, mqtt://host:port.
        #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
        mqtt: String,
        /// The topic every line is published to.
        #[arg(long)]
        topic: String,
        /// 0, 1 or 2.
        #[arg(long, default_value_t = 1)]
        qos: u8,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Publish { mqtt, topic, qos } => {
            let rest = mqtt
                .strip_prefix("mqtt://")
                .ok_or_else(|| anyhow::anyhow!("--mqtt {mqtt:?}: write mqtt://host:port"))?;
            let (host, port) = match rest.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_owned(),
                    p.parse()
                        .map_err(|_| anyhow::anyhow!("--mqtt {mqtt:?}: bad port {p:?}"))?,
                ),
                None => (rest.to_owned(), 1883),
            };
            let lines: Vec<String> = std::io::stdin().lines().collect::<Result<_, _>>()?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let p = rt.block_on(firmware_sim::publish::publish(
                &host, port, &topic, qos, lines,
            ))?;
            eprintln!(
                "published {} messages in {:.2} s ({:.0}/s)",
                p.messages,
                p.elapsed.as_secs_f64(),
                p.messages as f64 / p.elapsed.as_secs_f64()
            );
        }
        Command::BenchCodec {
            seed,
            mut batches,
            rounds,
            json,
        } => {
            if batches.is_empty() {
                batches = vec![1_000, 10_000];
            }
            if let Some(bad) = batches.iter().find(|&&b| b == 0) {
                anyhow::bail!("--batch {bad}: a batch needs at least 1 reading");
            }
            let spec = refdata::RefSpec::reference(seed);
            eprintln!(
                "generating the reference dataset: {} devices x {} metrics x {} s = {} readings (seed {seed})",
                spec.devices,
                refdata::METRICS.len(),
                spec.seconds,
                spec.readings()
            );
            let readings = refdata::generate(&spec);
            let mut figures = Vec::new();
            for &b in &batches {
                eprintln!("measuring batches of {b} readings ({rounds} rounds)...");
                figures.push(bench_codec::measure(&readings, b, rounds as usize)?);
            }
            // The headline is the largest batch measured.
            let head = figures
                .iter()
                .max_by_key(|f| f.batch)
                .expect("at least one batch size");
            if json {
                let out = json!({
                    "seed": seed,
                    "readings": readings.len(),
                    "batch": head.batch,
                    "bytes_per_reading": head.bytes_per_reading,
                    "peer_bytes_per_reading": head.peer_bytes_per_reading,
                    "ratio_to_peer": head.ratio_to_peer,
                    "encode_readings_per_sec": head.encode_readings_per_sec,
                    "decode_readings_per_sec": head.decode_readings_per_sec,
                    "batches": figures,
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!(
                    "{:>8} {:>10} {:>14} {:>8} {:>14} {:>14}",
                    "batch", "B/reading", "peer B/reading", "ratio", "encode r/s", "decode r/s"
                );
                for f in &figures {
                    println!(
                        "{:>8} {:>10.3} {:>14.3} {:>8.3} {:>14.0} {:>14.0}",
                        f.batch,
                        f.bytes_per_reading,
                        f.peer_bytes_per_reading,
                        f.ratio_to_peer,
                        f.encode_readings_per_sec,
                        f.decode_readings_per_sec
                    );
                }
                println!("peer: zstd level 3 over the same batches as JSON lines");
            }
        }
    }
    Ok(())
}
