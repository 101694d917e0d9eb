//! The `firmware-sim` command line.
#![forbid(unsafe_code)]

use anyhow::Result;
use clap::{Parser, Subcommand};
use firmware_sim::{bench_codec, refdata};
use serde_json::json;

/// Simulates Plantlink sensor fleets, load-tests the pipeline and verifies delivery.
///
/// `run` drives a fleet of devices over MQTT (their firmware's payload shapes, plant-like
/// signals, faults on demand) and writes a ledger of what the broker acknowledged; `verify`
/// checks that ledger against PostgreSQL and Kafka and fails on any loss or duplicate.
/// `bench-codec` measures the batch codec on the reference dataset.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Simulates a fleet publishing to MQTT and reports rate, acknowledgement latency and
    /// errors.
    ///
    /// Example: firmware-sim run --mqtt mqtt://127.0.0.1:1883 --devices 1000 --rate 1
    ///          --duration 60 --ledger run.db
    Run {
        /// The broker, mqtt://host:port.
        #[arg(long)]
        mqtt: Option<String>,
        /// The agent's CoAP endpoint, coap://host:port; with --mqtt too, every other device
        /// uses CoAP.
        #[arg(long)]
        coap: Option<String>,
        /// CoAP message type: con (confirmable, retransmitted until acknowledged) or non.
        #[arg(long, default_value = "con", value_parser = ["con", "non"])]
        coap_type: String,
        /// Devices to simulate.
        #[arg(long, default_value_t = 100)]
        devices: u32,
        /// Device types and their weights: bare, plant-json, multi-json, cbor, th100-v1
        /// (firmware 1.x field names), th100-v2 (2.x), th300-pb (protobuf on
        /// <prefix>/th-300/3.0.0/<device>; register its schema first: `firmware-sim
        /// protobuf-schema`), spb-node (a Sparkplug B edge node with devices d1 and d2 in
        /// group <run>-spb: births, alias-only data, d2's death at 70% and rebirth at 80%,
        /// NDEATH when it falls silent, births again on a rebirth NCMD; the agent needs
        /// `[mqtt.sparkplug]` with the default ids).
        #[arg(
            long,
            default_value = "multi-json=4,plant-json=2,cbor=2,th100-v1=1,th100-v2=1,bare=1"
        )]
        device_types: String,
        /// Messages per second per device.
        #[arg(long, default_value_t = 1.0)]
        rate: f64,
        /// How long to publish for: seconds (60) or with a unit (90s, 250ms, 5m, 1h).
        #[arg(long, default_value = "10s", value_parser = firmware_sim::run::parse_duration)]
        duration: f64,
        /// Seed; the same seed gives the same fleet and values.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// 0, 1 or 2.
        #[arg(long, default_value_t = 1)]
        qos: u8,
        /// Topic prefix: messages go to <prefix>/<device>[/<metric>].
        #[arg(long, default_value = "plant")]
        prefix: String,
        /// Run name (device ids start with it); a fresh one by default.
        #[arg(long)]
        run: Option<String>,
        /// Ledger file (SQLite) of every acknowledged reading, for `verify`.
        #[arg(long)]
        ledger: Option<std::path::PathBuf>,
        /// Share of messages after which the device resends its last (up to 5) messages, as
        /// after a reconnect: a duplicate burst (0 to 1).
        #[arg(long, default_value_t = 0.0)]
        duplicate_rate: f64,
        /// Share of messages replaced by a malformed payload (0 to 1).
        #[arg(long, default_value_t = 0.0)]
        malformed_rate: f64,
        /// Share of messages stamped 1 to 5 s in the past (0 to 1).
        #[arg(long, default_value_t = 0.0)]
        out_of_order_rate: f64,
        /// Share of messages replaced by a payload over 64 KiB (0 to 1).
        #[arg(long, default_value_t = 0.0)]
        oversize_rate: f64,
        /// Share of devices whose clock is 30 s to 5 min off (0 to 1).
        #[arg(long, default_value_t = 0.0)]
        skewed_devices: f64,
        /// Devices (the last ones) that fall silent halfway through, for absence alerts.
        #[arg(long, default_value_t = 0)]
        silent_devices: u32,
        /// Devices (the first ones) that run 60 degrees hot from 40% to 60% of the run,
        /// for threshold alerts at known times.
        #[arg(long, default_value_t = 0)]
        hot_devices: u32,
        /// Make the hot devices alternate instead: hot in the first half of every cycle of
        /// this length, cool in the second, counted from the Unix epoch (2s: hot in even
        /// seconds), so alerts come all through the run at times a reader knows.
        #[arg(long, value_parser = firmware_sim::run::parse_duration)]
        hot_cycle: Option<f64>,
        /// Devices (from the middle of the fleet) that flood at 50 times --rate; verify
        /// counts what the agent's rate limit dropped as expected.
        #[arg(long, default_value_t = 0)]
        flood_devices: u32,
        /// Signals: `plant` (random walks, daily cycles, vibration bursts, counters, run
        /// states) or `reference` (the reference dataset's values, as multi-metric JSON).
        #[arg(long, default_value = "plant", value_parser = ["plant", "reference"])]
        profile: String,
        /// Print one JSON object instead of a report, and no progress bar.
        #[arg(long)]
        json: bool,
    },
    /// Checks a run's ledger against PostgreSQL (and Kafka): prints lost, duplicated and
    /// unexpected readings with examples and per device, and exits 1 on any loss or
    /// duplicate.
    ///
    /// Example: firmware-sim verify --ledger run.db --postgres postgres://postgres@127.0.0.1/plantlink
    ///          --kafka 127.0.0.1:9092 --topic telemetry.readings
    Verify {
        /// The ledger `run` wrote.
        #[arg(long)]
        ledger: std::path::PathBuf,
        /// The run to check; the newest in the ledger by default.
        #[arg(long)]
        run: Option<String>,
        /// PostgreSQL holding raw_metrics.
        #[arg(long)]
        postgres: String,
        /// Kafka bootstrap brokers, to check the readings topic too.
        #[arg(long, requires = "topic")]
        kafka: Option<String>,
        /// The readings topic.
        #[arg(long)]
        topic: Option<String>,
        /// Only this tenant's rows and records (the gateway's `[gateway] tenant`): another
        /// tenant's devices may share the run's names in a shared database.
        #[arg(long)]
        tenant: Option<String>,
        /// Count a reading seen twice on Kafka as a failure (Kafka is at-least-once: a
        /// gateway's resend after a lost ack is produced again).
        #[arg(long)]
        strict_kafka: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Prints the `POST /v1/payload-schemas` body that registers the th300-pb device type's
    /// protobuf schema (descriptor set, message, field mapping), for the agent to read it.
    ///
    /// Example: firmware-sim protobuf-schema | curl -X POST -H "Authorization: Bearer $TOKEN"
    ///          -H 'Content-Type: application/json' --data @- http://127.0.0.1:8080/v1/payload-schemas
    ProtobufSchema,
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
        Command::Run {
            mqtt,
            coap,
            coap_type,
            devices,
            device_types,
            rate,
            duration,
            seed,
            qos,
            prefix,
            run,
            ledger,
            duplicate_rate,
            malformed_rate,
            out_of_order_rate,
            oversize_rate,
            skewed_devices,
            silent_devices,
            hot_devices,
            hot_cycle,
            flood_devices,
            profile,
            json,
        } => {
            let mix = firmware_sim::fleet::parse_mix(&device_types).map_err(anyhow::Error::msg)?;
            use firmware_sim::fleet::Kind;
            for (kind, what) in [
                (Kind::Th300Pb, "protobuf, which the agent reads"),
                (Kind::Sparkplug, "Sparkplug B, which is"),
            ] {
                anyhow::ensure!(
                    coap.is_none() || !mix.iter().any(|(k, w)| *k == kind && *w > 0),
                    "--device-types {kind} sends {what} over MQTT only; drop it from the mix with --coap"
                );
            }
            for (name, v) in [
                ("--duplicate-rate", duplicate_rate),
                ("--malformed-rate", malformed_rate),
                ("--out-of-order-rate", out_of_order_rate),
                ("--oversize-rate", oversize_rate),
                ("--skewed-devices", skewed_devices),
            ] {
                anyhow::ensure!(
                    (0.0..=1.0).contains(&v),
                    "{name} {v}: give a share from 0 to 1"
                );
            }
            let run = run.unwrap_or_else(|| {
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                format!("sim{t}")
            });
            anyhow::ensure!(
                !run.is_empty() && run.chars().all(|c| c.is_ascii_alphanumeric()),
                "--run {run:?}: use letters and digits only (device ids start with it)"
            );
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let mqtt = match (mqtt, &coap) {
                (None, None) => Some("mqtt://127.0.0.1:1883".to_owned()),
                (m, _) => m,
            };
            let report = rt.block_on(firmware_sim::run::run(firmware_sim::run::Options {
                mqtt,
                coap,
                coap_con: coap_type == "con",
                devices,
                mix,
                rate,
                duration,
                seed,
                qos,
                prefix,
                run,
                ledger,
                duplicate_rate,
                malformed_rate,
                out_of_order_rate,
                oversize_rate,
                skewed_devices,
                silent_devices,
                hot_devices,
                hot_cycle: hot_cycle.unwrap_or(0.0),
                flood_devices,
                reference: profile == "reference",
                progress: !json && std::io::IsTerminal::is_terminal(&std::io::stderr()),
            }))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "run {}: {} messages sent, {} acknowledged ({:.0}/s), {} readings expected\n\
                     publish-ack latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}\n\
                     errors and planted faults: {:?}",
                    report.run,
                    report.sent,
                    report.acked,
                    report.rate_per_sec,
                    report.readings,
                    report.latency_ms.p50,
                    report.latency_ms.p90,
                    report.latency_ms.p99,
                    report.latency_ms.max,
                    report.errors
                );
            }
        }
        Command::Verify {
            ledger,
            run,
            postgres,
            kafka,
            topic,
            tenant,
            strict_kafka,
            json,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let kafka = kafka.as_deref().zip(topic.as_deref());
            let r = rt.block_on(firmware_sim::verify::verify(
                &ledger,
                run.as_deref(),
                &postgres,
                kafka,
                tenant.as_deref(),
            ))?;
            let ok = r.ok(strict_kafka);
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "verify {}: expected {}, found {}, lost {}, duplicated {}, unexpected {}",
                    r.run, r.expected, r.found, r.lost, r.duplicated, r.unexpected
                );
                if let Some(k) = &r.kafka {
                    println!(
                        "kafka: {} records, lost {}, seen twice {}",
                        k.records, k.lost, k.duplicated
                    );
                }
                if !r.expected_rejections.is_empty() {
                    println!(
                        "refusals planted (not counted as loss): {:?}",
                        r.expected_rejections
                    );
                }
                for e in &r.examples {
                    println!("  {e}");
                }
                for (d, (l, dup, u)) in r.devices.iter().take(20) {
                    println!("  device {d}: lost {l}, duplicated {dup}, unexpected {u}");
                }
                println!(
                    "{}",
                    if ok {
                        "OK: every acknowledged reading is stored exactly once"
                    } else {
                        "FAILED"
                    }
                );
            }
            if !ok {
                std::process::exit(1);
            }
        }
        Command::ProtobufSchema => {
            println!("{}", firmware_sim::protobuf::schema_body());
        }
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
