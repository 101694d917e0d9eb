//! The `cloud-ingest` command line.
#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use cloud_ingest::pki;

/// Plantlink cloud ingest: receives batches from edge agents.
///
/// It accepts gateways that present a certificate from the fleet CA over QUIC, and fans
/// every batch out to Kafka, to stream alerting and to TimescaleDB or PostgreSQL with
/// hourly and daily rollups. It acknowledges a batch only when every sink has it, and
/// serves a query API over what it stored, with a fleet console for people at
/// http://<[api] bind>/console (sign in with a tenant's token).
///
/// Commands: the fleet PKI (`pki`), the schema (`migrate`), `check-config`, and `run`, which
/// admits gateways over QUIC and fans their batches out, in one process or as roles apart
/// (`--role`).
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// The service's TOML configuration (see deploy/cloud-ingest.example.toml).
    #[arg(
        long,
        short,
        env = "PLANTLINK_CLOUD_CONFIG",
        default_value = "/etc/plantlink/cloud-ingest.toml"
    )]
    config: PathBuf,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// What this process does, comma-separated: receiver (admits gateways over QUIC), writer
    /// (writes PostgreSQL), alerting (evaluates rules). All three, the default, is the
    /// single-node mode. Any other set is the scale-out mode, with Kafka in the middle
    /// ([kafka] brokers required): `--role receiver` produces every accepted batch to the
    /// backbone topic and acknowledges gateways once Kafka has it; `--role writer` is a
    /// consumer group that writes it to PostgreSQL, its offsets kept in pipeline_offsets with
    /// the rows; `--role alerting` is a consumer group that evaluates the rules per partition
    /// and rebuilds a partition's windows when it moves. `check-config` says which roles a
    /// config can run. See deploy/SCALING.md.
    #[arg(
        long,
        default_value = "receiver,writer,alerting",
        env = "PLANTLINK_ROLES"
    )]
    role: cloud_ingest::config::Roles,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Accepts gateways and writes their batches until SIGTERM or Ctrl-C. SIGHUP reloads
    /// the revocation list (`quic.revocation_file`) and closes the connections it revokes.
    Run(RunArgs),
    /// Creates or completes the database schema, or upgrades one that an earlier release
    /// made, in place and in one transaction; safe to run again, and from several replicas at
    /// once. Refuses a schema newer than this binary. `run` does the same at start.
    Migrate(ConfigArg),
    /// Checks a configuration without starting anything, and reports the roles it can run
    /// (single node, receiver, writer, alerting) and what each would use; with --role, exits
    /// non-zero unless that set can run.
    ///
    /// Example: cloud-ingest check-config --config /etc/plantlink/cloud-ingest.toml --role writer
    CheckConfig(CheckArgs),
    /// The fleet PKI: a CA, the server certificate, and one certificate per gateway.
    #[command(subcommand)]
    Pki(PkiCommand),
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The roles this process is meant for; the check fails unless the config can run them.
    #[arg(long)]
    role: Option<cloud_ingest::config::Roles>,
}

#[derive(Debug, Subcommand)]
enum PkiCommand {
    /// Creates the fleet CA (ca.pem, ca.key) in DIR. Keep ca.key offline if you can.
    Init {
        /// The PKI folder; created if missing.
        #[arg(long)]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: i64,
    },
    /// Issues the cloud's server certificate (server.pem, server.key) for its DNS names and IPs.
    ///
    /// Example: cloud-ingest pki server --dir pki --dns ingest.plant.example --ip 10.0.0.5
    Server {
        /// The PKI folder holding the CA.
        #[arg(long)]
        dir: PathBuf,
        /// A DNS name gateways use to reach the cloud; repeat for several.
        #[arg(long)]
        dns: Vec<String>,
        /// An IP address gateways use to reach the cloud; repeat for several.
        #[arg(long)]
        ip: Vec<IpAddr>,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: i64,
    },
    /// Issues a gateway's certificate and key (<ID>.pem, <ID>.key), carrying its id and tenant.
    ///
    /// Example: cloud-ingest pki gateway --dir pki --gateway-id gw-plant1-01 --tenant acme
    Gateway {
        /// The PKI folder holding the CA.
        #[arg(long)]
        dir: PathBuf,
        /// The gateway id; must match `[gateway] id` in the agent's config.
        #[arg(long)]
        gateway_id: String,
        /// The tenant whose devices this gateway may write.
        #[arg(long)]
        tenant: String,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: i64,
    },
    /// Revokes a certificate (by serial, fingerprint or certificate file) or every
    /// certificate of a gateway id: appends to DIR/revoked.txt, the file `quic.revocation_file`
    /// points at. A running cloud-ingest picks it up on SIGHUP (or within
    /// `quic.revocation_poll_secs`) and closes the revoked gateway's connection.
    ///
    /// Example: cloud-ingest pki revoke --dir pki --cert pki/gw-plant1-01.pem
    #[command(group(clap::ArgGroup::new("what").required(true)
        .args(["serial", "fingerprint", "gateway_id", "cert"])))]
    Revoke {
        /// The PKI folder; the list is DIR/revoked.txt (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// A certificate serial number in hex (as `openssl x509 -serial` prints it).
        #[arg(long)]
        serial: Option<String>,
        /// A certificate's SHA-256 fingerprint in hex (`openssl x509 -fingerprint -sha256`).
        #[arg(long)]
        fingerprint: Option<String>,
        /// Every certificate of this gateway id, also those issued later; to reissue the
        /// same id, revoke its certificate instead.
        #[arg(long)]
        gateway_id: Option<String>,
        /// A certificate file (PEM): its serial and fingerprint are revoked.
        #[arg(long)]
        cert: Option<PathBuf>,
        /// A note written above the entry (who, why).
        #[arg(long)]
        note: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(c) => {
            init_logging();
            let config = cloud_ingest::config::Config::load(&c.config.config)?;
            runtime()?.block_on(async {
                if let Some(m) = &config.metrics {
                    cloud_ingest::telemetry::install(m.bind)?;
                }
                let server = cloud_ingest::server::Server::bind_roles(config, c.role)?;
                // Registered before serving, so that SIGHUP never falls to its default (exit).
                let mut hangup =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
                let reloader = server.reloader();
                tokio::spawn(async move {
                    while hangup.recv().await.is_some() {
                        let _ = reloader.reload("SIGHUP");
                    }
                });
                let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    shutdown_signal().await;
                    let _ = stop_tx.send(true);
                });
                server.serve(stop_rx).await
            })?;
        }
        Command::Migrate(c) => {
            let config = cloud_ingest::config::Config::load(&c.config)?;
            runtime()?.block_on(async {
                let client = cloud_ingest::postgres::connect(&config.postgres.url)
                    .await
                    .map_err(|e| anyhow::anyhow!("postgres.url: cannot connect: {e}"))?;
                let found = cloud_ingest::postgres::upgrade::current(&client).await?;
                let flavor = cloud_ingest::postgres::migrate(&client, &config.postgres).await?;
                let version = cloud_ingest::postgres::schema::VERSION;
                if found > 0 && found < version {
                    println!("schema upgraded in place from version {found} to {version}");
                }
                match flavor {
                    cloud_ingest::postgres::Flavor::Timescale => println!(
                        "schema version {version} is up to date (TimescaleDB: hypertable, \
                         continuous aggregates, compression and retention policies)"
                    ),
                    cloud_ingest::postgres::Flavor::Plain => println!(
                        "schema version {version} is up to date (plain PostgreSQL: daily \
                         partitions and rollups kept by `cloud-ingest run`)"
                    ),
                }
                anyhow::Ok(())
            })?;
        }
        Command::CheckConfig(c) => check_config(&c)?,
        Command::Pki(PkiCommand::Init { dir, days }) => {
            let p = pki::init(&dir, days)?;
            println!(
                "fleet CA written: {} (key {}, mode 0600)",
                p.display(),
                dir.join("ca.key").display()
            );
        }
        Command::Pki(PkiCommand::Server { dir, dns, ip, days }) => {
            if dns.is_empty() && ip.is_empty() {
                anyhow::bail!(
                    "give at least one --dns NAME or --ip ADDRESS that gateways use to reach the cloud"
                );
            }
            let p = pki::server(&dir, &dns, &ip, days)?;
            println!("server certificate written: {}", p.display());
        }
        Command::Pki(PkiCommand::Gateway {
            dir,
            gateway_id,
            tenant,
            days,
        }) => {
            let p = pki::gateway(&dir, &gateway_id, &tenant, days)?;
            println!(
                "gateway certificate written: {} (key {}); copy both and ca.pem to the gateway",
                p.display(),
                dir.join(format!("{gateway_id}.key")).display()
            );
        }
        Command::Pki(PkiCommand::Revoke {
            dir,
            serial,
            fingerprint,
            gateway_id,
            cert,
            note,
        }) => revoke(&dir, serial, fingerprint, gateway_id, cert, note)?,
    }
    Ok(())
}

fn check_config(c: &CheckArgs) -> anyhow::Result<()> {
    use cloud_ingest::config::Roles;
    let path = &c.config.config;
    let config = cloud_ingest::config::Config::load(path)?;
    println!("config {}: valid", path.display());
    println!("roles it can run:");
    let mut sets: Vec<Roles> = Roles::REPORTED.to_vec();
    if let Some(r) = c.role
        && !sets.contains(&r)
    {
        sets.push(r);
    }
    for r in &sets {
        let mode = if r.scale_out() {
            "scale-out"
        } else {
            "single node"
        };
        let missing = r.missing(&config);
        if missing.is_empty() {
            println!("  --role {r} ({mode}): yes");
            for u in r.uses(&config) {
                println!("      {u}");
            }
        } else {
            println!("  --role {r} ({mode}): no");
            for m in missing {
                println!("      {m}");
            }
        }
    }
    if let Some(r) = c.role {
        r.check(&config)?;
        println!("--role {r}: this config can run it");
    }
    Ok(())
}

fn revoke(
    dir: &std::path::Path,
    serial: Option<String>,
    fingerprint: Option<String>,
    gateway_id: Option<String>,
    cert: Option<PathBuf>,
    note: Option<String>,
) -> anyhow::Result<()> {
    use pki::revocation::{self, Entry};
    let bad = |what: &str, e: String| anyhow::anyhow!("{what}: {e}");
    let (entries, what) = if let Some(s) = serial {
        (
            vec![Entry::serial(&s).map_err(|e| bad("--serial", e))?],
            format!("serial {s}"),
        )
    } else if let Some(f) = fingerprint {
        (
            vec![Entry::fingerprint(&f).map_err(|e| bad("--fingerprint", e))?],
            format!("fingerprint {f}"),
        )
    } else if let Some(g) = gateway_id {
        (
            vec![Entry::gateway(&g).map_err(|e| bad("--gateway-id", e))?],
            format!("every certificate of gateway {g}"),
        )
    } else if let Some(c) = cert {
        let der = pki::read_certificate(&c)?;
        let (serial, fp) = pki::serial_and_fingerprint(&der)?;
        let whose = match pki::identity(&der) {
            Ok(id) => format!(" (gateway {}, tenant {})", id.gateway, id.tenant),
            Err(_) => String::new(),
        };
        (
            vec![Entry::Serial(serial), Entry::Fingerprint(fp)],
            format!("certificate {}{whose}", c.display()),
        )
    } else {
        anyhow::bail!("give one of --serial, --fingerprint, --gateway-id or --cert");
    };
    let path = dir.join(revocation::FILE_NAME);
    let when = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let note = match note {
        Some(n) => format!("{when} revoked {what}: {n}"),
        None => format!("{when} revoked {what}"),
    };
    let written = revocation::append(&path, &entries, &note)?;
    if written.is_empty() {
        println!("{} already revokes {what}; nothing written", path.display());
        return Ok(());
    }
    for e in &written {
        println!("{}: {e}", path.display());
    }
    println!(
        "Point quic.revocation_file at {} (once); a running cloud-ingest reloads it on SIGHUP \
         (systemctl reload cloud-ingest, or kill -HUP <pid>) and, if quic.revocation_poll_secs \
         is not 0, by itself within that many seconds; it then closes the revoked connections.",
        path.display()
    );
    Ok(())
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

async fn shutdown_signal() {
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
