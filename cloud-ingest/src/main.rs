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
/// serves a query API over what it stored.
///
/// Today it manages the fleet PKI; ingest itself comes with the next releases.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The fleet PKI: a CA, the server certificate, and one certificate per gateway.
    #[command(subcommand)]
    Pki(PkiCommand),
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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
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
    }
    Ok(())
}
