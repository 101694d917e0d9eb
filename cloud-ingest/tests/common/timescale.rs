//! A private PostgreSQL 15 cluster that preloads TimescaleDB: `initdb` into a folder of its
//! own, a free port, `pg_ctl start`; stopped and removed on drop. Tests that need it call
//! [`Cluster::start`], which answers `None` (after one loud line naming what to install) on
//! a machine without the extension files.
//!
//! The cluster runs no background jobs (`timescaledb.max_background_workers = 0`): a policy
//! would otherwise act on the tests' data at moments of its own choosing (the retention
//! policy drops month-old test chunks mid-test). Tests run policies with `CALL run_job(...)`.

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct Cluster {
    dir: PathBuf,
    pub port: u16,
}

fn pg_bin(name: &str) -> PathBuf {
    Path::new(BIN).join(name)
}

/// Whether this PostgreSQL 15 installation has TimescaleDB's files.
pub fn installed() -> bool {
    let out = Command::new(pg_bin("pg_config"))
        .arg("--pkglibdir")
        .output();
    let Ok(out) = out else { return false };
    let lib = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Path::new(&lib).join("timescaledb.so").is_file()
}

/// Whether the server behind `c` preloads TimescaleDB.
pub async fn preloaded(c: &tokio_postgres::Client) -> bool {
    let libs: String = c
        .query_one("SELECT current_setting('shared_preload_libraries')", &[])
        .await
        .unwrap()
        .get(0);
    libs.split(',')
        .any(|l| l.trim().trim_matches('"') == "timescaledb")
}

/// Runs a PostgreSQL program as the `postgres` user when we are root (initdb refuses root).
fn as_postgres(program: &Path) -> Command {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.trim_ascii() == b"0")
        .unwrap_or(false);
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Cluster {
    /// Starts a cluster for `tag`, or says loudly why not and answers `None`.
    pub fn start(tag: &str) -> Option<Self> {
        Self::start_with(tag, false)
    }

    /// The same, with TimescaleDB's job scheduler running (for tests of job watching).
    pub fn start_with_scheduler(tag: &str) -> Option<Self> {
        Self::start_with(tag, true)
    }

    fn start_with(tag: &str, scheduler: bool) -> Option<Self> {
        if !installed() {
            eprintln!(
                "SKIPPED (TimescaleDB): this machine's PostgreSQL 15 has no TimescaleDB files; \
                 install timescaledb-2-postgresql-15 (Timescale's package) or run \
                 ../shared/timescaledb/install.sh, as tests/run.sh does"
            );
            return None;
        }
        let dir = std::env::temp_dir().join(format!("plantlink-tsdb-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok || !dir.exists(),
            "cannot give {} to postgres",
            dir.display()
        );
        let data = dir.join("data");
        let st = as_postgres(&pg_bin("initdb"))
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "initdb failed for {}", data.display());
        let port = super::free_tcp_port();
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             shared_preload_libraries = 'timescaledb'\ntimescaledb.telemetry_level = off\n\
             timescaledb.max_background_workers = {workers}\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n",
            dir.display(),
            workers = if scheduler { 8 } else { 0 },
        );
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(&mut f, conf.as_bytes()).unwrap();
        let st = as_postgres(&pg_bin("pg_ctl"))
            .args(["-w", "-t", "60", "-l"])
            .arg(dir.join("log"))
            .arg("-D")
            .arg(&data)
            .arg("start")
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(
            st.success(),
            "pg_ctl start failed; see {}",
            dir.join("log").display()
        );
        Some(Self { dir, port })
    }

    /// The DSN of the cluster's `postgres` database.
    pub fn admin_dsn(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    /// The DSN of database `db` on the cluster.
    pub fn dsn(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db}",
            self.port
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = as_postgres(&pg_bin("pg_ctl"))
            .args(["-m", "immediate", "-D"])
            .arg(self.dir.join("data"))
            .arg("stop")
            .stdout(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where a storage test runs: the shared plain PostgreSQL, or a private TimescaleDB cluster.
pub enum Backend {
    Plain,
    Timescale(Cluster),
}

impl Backend {
    /// Plain PostgreSQL always; TimescaleDB too where its files are installed (else one loud
    /// line says what is skipped and what to install).
    pub fn all(tag: &str) -> Vec<Backend> {
        let mut v = vec![Backend::Plain];
        if let Some(c) = Cluster::start(tag) {
            v.push(Backend::Timescale(c));
        }
        v
    }

    pub fn flavor(&self) -> cloud_ingest::postgres::Flavor {
        match self {
            Backend::Plain => cloud_ingest::postgres::Flavor::Plain,
            Backend::Timescale(_) => cloud_ingest::postgres::Flavor::Timescale,
        }
    }

    pub fn admin_dsn(&self) -> String {
        match self {
            Backend::Plain => super::admin_dsn(),
            Backend::Timescale(c) => c.admin_dsn(),
        }
    }

    /// The DSN of database `db` on this backend.
    pub fn dsn(&self, db: &str) -> String {
        format!(
            "{} dbname={db}",
            self.admin_dsn().replace("dbname=postgres", "")
        )
    }

    /// Plain PostgreSQL or TimescaleDB, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Plain => "plain PostgreSQL",
            Backend::Timescale(_) => "TimescaleDB",
        }
    }

    /// A database `db` of the test's own on this backend, migrated to this flavour: the
    /// admin client (to drop it with), its URL, and a client connected to it.
    pub async fn database(
        &self,
        db: &str,
    ) -> (tokio_postgres::Client, String, tokio_postgres::Client) {
        let admin = super::pg(&self.admin_dsn(), db).await;
        let url = self.dsn(db);
        let client = cloud_ingest::postgres::connect(&url).await.unwrap();
        let flavor = cloud_ingest::postgres::migrate(&client, &self.config(&url))
            .await
            .unwrap();
        assert_eq!(flavor, self.flavor(), "{}", self.name());
        (admin, url, client)
    }

    /// Writes `parts` in one transaction, as the sink does (on plain PostgreSQL, after
    /// creating the partitions of their days).
    pub async fn write(
        &self,
        c: &mut tokio_postgres::Client,
        parts: &[cloud_ingest::postgres::Part<'_>],
    ) -> cloud_ingest::postgres::Written {
        use cloud_ingest::postgres::maintain;
        c.batch_execute(cloud_ingest::postgres::STAGING)
            .await
            .unwrap();
        if let Backend::Plain = self {
            let days: std::collections::BTreeSet<i64> = parts
                .iter()
                .flat_map(|p| p.readings.iter().map(|r| maintain::day_of(r.ts.0)))
                .collect();
            maintain::Partitions::default()
                .ensure(c, &days)
                .await
                .unwrap();
        }
        cloud_ingest::postgres::write(c, self.flavor(), parts)
            .await
            .unwrap()
    }

    /// What the upkeep does for the rollups on this flavour, for a raw retention of
    /// `raw_days`: plain re-rolls the marked buckets, TimescaleDB refreshes them.
    pub async fn roll(&self, c: &tokio_postgres::Client, raw_days: u32) {
        match self {
            Backend::Plain => {
                cloud_ingest::postgres::maintain::roll(c).await.unwrap();
            }
            Backend::Timescale(_) => {
                cloud_ingest::postgres::refresh::refresh(c, raw_days)
                    .await
                    .unwrap();
            }
        }
    }

    /// A `[postgres]` config for `url` that insists on this backend's flavour.
    pub fn config(&self, url: &str) -> cloud_ingest::config::Postgres {
        let mut cfg = cloud_ingest::config::Postgres::with_url(url);
        cfg.timescaledb = match self {
            Backend::Plain => cloud_ingest::config::Timescale::Off,
            Backend::Timescale(_) => cloud_ingest::config::Timescale::On,
        };
        cfg
    }
}
