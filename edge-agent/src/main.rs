//! The `edge-agent` command line.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use edge_agent::config::Config;
use edge_agent::{agent, check, payload, store, telemetry};

/// Plantlink edge agent: runs on a plant gateway.
///
/// It collects readings from the plant's MQTT broker and from CoAP devices, decodes the
/// payloads of each firmware version, drops duplicates and floods, and keeps every reading
/// durably in a SQLite queue until the cloud has it. A device is acknowledged only after
/// its reading is on disk. With `[metrics] bind`, a status page for the technician (uplink,
/// queue, dead letters, busiest devices) is at http://<bind>/, beside /metrics.
///
/// Start with `edge-agent check-config --config FILE` (add `--topic TOPIC` to see the
/// device, metric and tags a topic becomes); deploy/edge-agent.example.toml documents
/// every key.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// The agent's TOML configuration.
    #[arg(
        long,
        short,
        env = "PLANTLINK_EDGE_CONFIG",
        default_value = "/etc/plantlink/edge-agent.toml"
    )]
    config: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the agent until SIGTERM or Ctrl-C, then commits and acknowledges what it received.
    Run(ConfigArg),
    /// Checks a configuration file and prints what it sets up, including which device id
    /// each topic template makes; exits non-zero on any error.
    ///
    /// Without --topic it shows, for each [[mqtt.topics]] entry, an example topic built from
    /// the template (each {name} replaced by name1) and the device, metric and tags it
    /// becomes. With --topic it shows that for real topics instead, and exits non-zero if
    /// one of them matches no template:
    ///
    /// edge-agent check-config -c agent.toml --topic plant/p1/l3/press01/t --topic plant/p1/l4/press01/t
    ///
    /// Use it to check that devices sharing a name on different lines get different ids
    /// (device = "{line}-{device}" in [[mqtt.topics]]): readings of two devices with one
    /// id collide whenever they carry the same timestamp.
    CheckConfig(CheckConfigArgs),
    /// Inspects the queue file (safe while the agent runs).
    #[command(subcommand)]
    Queue(QueueCommand),
}

#[derive(Debug, clap::Args)]
struct CheckConfigArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// An MQTT topic to resolve: prints the template it matches and the device, metric and
    /// tags it becomes, or that it matches none. Repeat for several topics.
    #[arg(long = "topic", value_name = "TOPIC")]
    topics: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum QueueCommand {
    /// Readings, bytes, devices, dead letters and the oldest reading, with per-device counts.
    Stats {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The newest dead letters (payloads refused here: what, from where, and why), then the
    /// quarantine: single readings the cloud refused, kept instead of being sent again.
    DeadLetters {
        #[command(flatten)]
        config: ConfigArg,
        /// How many to show.
        #[arg(long, default_value_t = 20)]
        limit: u64,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Decodes dead letters of one reason again, with the schemas in force now: e.g. the
    /// protobuf messages refused as `no_schema` before their schema reached the gateway.
    /// Works while the agent runs (it replays within a second) or not (it replays when it
    /// starts). Each becomes readings, or a dead letter again with its new reason. MQTT
    /// messages only, and only those whose whole payload was kept (up to 4 KiB).
    ReplayDeadLetters {
        #[command(flatten)]
        config: ConfigArg,
        /// The reason label, as `queue dead-letters` shows it: no_schema, unknown_alias,
        /// seq_gap, wrong_type, malformed, ...
        #[arg(long)]
        reason: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(c) => {
            telemetry::init_logging();
            let config = Config::load(&c.config)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(agent::run(config))
        }
        Command::CheckConfig(c) => {
            let path = &c.config.config;
            let config = Config::load(path)?;
            print!("{}", check::summary(path, &config));
            if c.topics.is_empty() {
                print!("{}", check::examples(&config));
                return Ok(());
            }
            let (text, unmatched) = check::explain(&config, &c.topics);
            print!("{text}");
            anyhow::ensure!(
                unmatched == 0,
                "{unmatched} of {} topic(s) match no [[mqtt.topics]] template",
                c.topics.len()
            );
            Ok(())
        }
        Command::Queue(QueueCommand::Stats { config, json }) => {
            let cfg = Config::load(&config.config)?;
            let conn = open_queue(&cfg)?;
            let s = store::stats(&conn).context("reading queue statistics")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("queue       {}", cfg.store.path.display());
                println!("readings    {}", s.readings);
                println!("bytes       {} (file {})", s.bytes, s.file_bytes);
                println!("devices     {}", s.devices);
                println!("dead letters {}", s.dead_letters);
                println!("quarantined {}", s.quarantined);
                println!("evicted     {}", s.evicted);
                if s.schema_set_version > 0 {
                    println!(
                        "schema set  version {} ({} schemas from the registry)",
                        s.schema_set_version, s.schemas
                    );
                } else {
                    println!("schema set  none received yet");
                }
                if s.replay_pending > 0 {
                    println!("replaying   {} dead letters pending", s.replay_pending);
                }
                match s.oldest_ts {
                    Some(ts) => println!("oldest      {}", rfc3339(ts)),
                    None => println!("oldest      -"),
                }
                if !s.per_device.is_empty() {
                    println!(
                        "\n{:<32} {:>10} {:>10} {:>12}",
                        "device", "readings", "evicted", "rate_limited"
                    );
                    for d in s.per_device.iter().take(50) {
                        println!(
                            "{:<32} {:>10} {:>10} {:>12}",
                            d.device, d.readings, d.evicted, d.rate_limited
                        );
                    }
                }
            }
            Ok(())
        }
        Command::Queue(QueueCommand::ReplayDeadLetters { config, reason }) => {
            replay(&config.config, &reason)
        }
        Command::Queue(QueueCommand::DeadLetters {
            config,
            limit,
            json,
        }) => {
            let cfg = Config::load(&config.config)?;
            let conn = open_queue(&cfg)?;
            let list = store::dead_letters(&conn, limit).context("reading dead letters")?;
            for d in list {
                if json {
                    let mut v = serde_json::to_value(&d)?;
                    v["payload_preview"] = payload::preview(&d.payload).into();
                    println!("{v}");
                } else {
                    println!(
                        "{}  {:<5} {:<14} {}  {}  [{} bytes] {:?}",
                        rfc3339(d.received_us),
                        d.source,
                        d.reason,
                        d.origin,
                        d.detail,
                        d.size,
                        payload::preview(&d.payload)
                    );
                }
            }
            let held = store::quarantined(&conn, limit).context("reading the quarantine")?;
            if !held.is_empty() && !json {
                println!("\nquarantine (readings the cloud refused; not sent again):");
            }
            for q in held {
                if json {
                    let mut v = serde_json::to_value(&q)?;
                    v["kind"] = "quarantine".into();
                    println!("{v}");
                } else {
                    println!(
                        "{}  cloud {:<14} {} {} {}{} = {}  {}",
                        rfc3339(q.at_us),
                        q.reason,
                        q.device,
                        q.metric,
                        rfc3339(q.ts),
                        if q.tags.is_empty() {
                            String::new()
                        } else {
                            format!(" {}", q.tags)
                        },
                        q.value.map_or("NaN".to_owned(), |v| v.to_string()),
                        q.detail
                    );
                }
            }
            Ok(())
        }
    }
}

fn replay(config: &Path, reason: &str) -> anyhow::Result<()> {
    let cfg = Config::load(config)?;
    let known: Vec<&str> = payload::Reason::ALL.iter().map(|r| r.as_str()).collect();
    anyhow::ensure!(
        known.contains(&reason),
        "--reason {reason:?} is not a dead-letter reason; use one of: {}",
        known.join(", ")
    );
    let _ = open_queue(&cfg)?;
    let (marked, cannot) = store::mark_for_replay(&cfg.store.path, reason)
        .with_context(|| format!("marking dead letters in {}", cfg.store.path.display()))?;
    println!(
        "{marked} dead letter(s) of reason {reason} marked for replay; a running agent replays them within a second, a stopped one when it starts (`edge-agent queue stats` shows what is pending)"
    );
    if cannot > 0 {
        println!(
            "{cannot} cannot be replayed: CoAP requests, or payloads over 4 KiB (only their first bytes were kept)"
        );
    }
    Ok(())
}

fn open_queue(cfg: &Config) -> anyhow::Result<rusqlite::Connection> {
    let path = &cfg.store.path;
    anyhow::ensure!(
        path.exists(),
        "queue {} does not exist yet; it is created when `edge-agent run` first starts",
        path.display()
    );
    let conn =
        store::open_read_only(path).with_context(|| format!("opening queue {}", path.display()))?;
    let version = store::schema_version(&conn)
        .with_context(|| format!("reading the schema version of queue {}", path.display()))?;
    if let Some(v) = version.filter(|v| *v < store::SCHEMA_VERSION) {
        anyhow::bail!(
            "queue {} has schema version {v}, older than this edge-agent's {}; start \
             `edge-agent run` once (it upgrades the file in place, keeping every reading), or \
             inspect it with the edge-agent release that wrote it",
            path.display(),
            store::SCHEMA_VERSION
        );
    }
    Ok(conn)
}

fn rfc3339(us: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(us as i128 * 1000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{us} µs"))
}
