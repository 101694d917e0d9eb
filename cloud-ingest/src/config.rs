//! cloud-ingest's TOML configuration; `deploy/cloud-ingest.example.toml` is the commented
//! example, loaded by a test. Unknown keys are errors. Relative paths are taken from the
//! folder of the config file, so a unit file can point at it from anywhere.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The QUIC listener.
    pub quic: Quic,
    /// The PostgreSQL sink.
    pub postgres: Postgres,
    /// The Prometheus endpoint; absent means none.
    pub metrics: Option<Metrics>,
}

/// `[quic]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quic {
    /// UDP address to listen on, e.g. `0.0.0.0:4433`.
    pub bind: SocketAddr,
    /// The server certificate (`cloud-ingest pki server`).
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// The fleet CA that gateway certificates must chain to.
    pub client_ca: PathBuf,
    /// Gateway ids refused at the handshake although their certificates are valid.
    #[serde(default)]
    pub revoked: Vec<String>,
    /// Batches a gateway may have unacknowledged.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: u32,
    /// Largest batch frame accepted, in bytes.
    #[serde(default = "default_batch_bytes")]
    pub max_batch_bytes: u32,
}

fn default_in_flight() -> u32 {
    16
}
fn default_batch_bytes() -> u32 {
    8 << 20
}

/// `[postgres]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Postgres {
    /// Connection string, `postgres://user@host/db` or `host=... user=... dbname=...`.
    pub url: String,
}

/// `[metrics]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Address of `/metrics`, e.g. `127.0.0.1:9320`.
    pub bind: SocketAddr,
}

impl Config {
    /// Reads and checks a config file; errors name the file and the key.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        let mut c: Config = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!("config {}: {}", path.display(), e.to_string().trim_end())
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut c.quic.cert, &mut c.quic.key, &mut c.quic.client_ca] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        c.postgres
            .url
            .parse::<tokio_postgres::Config>()
            .map_err(|e| anyhow::anyhow!("config {}: postgres.url: {e}", path.display()))?;
        anyhow::ensure!(
            (1..=1024).contains(&c.quic.max_in_flight),
            "config {}: quic.max_in_flight = {} must be from 1 to 1024",
            path.display(),
            c.quic.max_in_flight
        );
        anyhow::ensure!(
            (1024..=(64 << 20)).contains(&c.quic.max_batch_bytes),
            "config {}: quic.max_batch_bytes = {} must be from 1024 to 67108864",
            path.display(),
            c.quic.max_batch_bytes
        );
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_loads_and_resolves_paths() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cloud-ingest.example.toml");
        let c = Config::load(&p).unwrap();
        assert_eq!(c.quic.bind.port(), 4433);
        assert_eq!(c.quic.cert, p.parent().unwrap().join("pki/server.pem"));
        assert_eq!(c.quic.revoked, Vec::<String>::new());
    }

    #[test]
    fn unknown_keys_are_named() {
        let dir = std::env::temp_dir().join(format!("plantlink-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(&f, "[quic]\nbind = \"0.0.0.0:4433\"\ncert = \"a\"\nkey = \"b\"\nclient_ca = \"c\"\nrevokd = []\n[postgres]\nurl = \"host=x\"\n").unwrap();
        let err = Config::load(&f).unwrap_err().to_string();
        assert!(err.contains("revokd"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
