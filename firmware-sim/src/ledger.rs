//! The ledger: every reading the broker acknowledged, by identity, and what was meant to be
//! refused and why. A SQLite file, so it survives the run and `verify` can read it later.

use std::path::Path;

use rusqlite::{Connection, params};

/// An open ledger.
#[derive(Debug)]
pub struct Ledger {
    conn: Connection,
    run: String,
}

/// What a ledger holds for one run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Expected {
    /// (device, metric, ts µs) of readings with a device time.
    pub timed: Vec<(String, String, i64)>,
    /// (device, metric, count) of readings the agent stamps with its receive time.
    pub stamped: Vec<(String, String, i64)>,
    /// (reason, count) of what was meant to be refused.
    pub rejected: Vec<(String, i64)>,
    /// Devices whose readings the agent may drop by its rate limit.
    pub best_effort: Vec<String>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS runs (run TEXT PRIMARY KEY, started_us INTEGER NOT NULL, args TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS readings (
    run TEXT NOT NULL, device TEXT NOT NULL, metric TEXT NOT NULL, ts_us INTEGER NOT NULL,
    value REAL NOT NULL, PRIMARY KEY (run, device, metric, ts_us)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stamped (
    run TEXT NOT NULL, device TEXT NOT NULL, metric TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (run, device, metric)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS best_effort (
    run TEXT NOT NULL, device TEXT NOT NULL, PRIMARY KEY (run, device)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rejected (
    run TEXT NOT NULL, device TEXT NOT NULL, reason TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (run, device, reason)) WITHOUT ROWID;
";

impl Ledger {
    /// Opens (or creates) the ledger at `path` for a new run named `run`.
    pub fn create(path: &Path, run: &str, args: &str, started_us: i64) -> rusqlite::Result<Self> {
        let conn = Connection::open(path)?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")?;
        conn.execute_batch(SCHEMA)?;
        conn.execute(
            "INSERT OR REPLACE INTO runs (run, started_us, args) VALUES (?1, ?2, ?3)",
            params![run, started_us, args],
        )?;
        Ok(Self {
            conn,
            run: run.to_owned(),
        })
    }

    /// Records acknowledged readings and refusals in one transaction.
    pub fn record(
        &mut self,
        device: &str,
        readings: &[(&str, Option<i64>, f64)],
        rejected: Option<&str>,
    ) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        for (metric, ts, value) in readings {
            match ts {
                Some(ts) => {
                    tx.prepare_cached(
                        "INSERT OR IGNORE INTO readings (run, device, metric, ts_us, value) VALUES (?1, ?2, ?3, ?4, ?5)",
                    )?
                    .execute(params![self.run, device, metric, ts, value])?;
                }
                None => {
                    tx.prepare_cached(
                        "INSERT INTO stamped (run, device, metric, count) VALUES (?1, ?2, ?3, 1)
                         ON CONFLICT (run, device, metric) DO UPDATE SET count = count + 1",
                    )?
                    .execute(params![self.run, device, metric])?;
                }
            }
        }
        if let Some(reason) = rejected {
            tx.prepare_cached(
                "INSERT INTO rejected (run, device, reason, count) VALUES (?1, ?2, ?3, 1)
                 ON CONFLICT (run, device, reason) DO UPDATE SET count = count + 1",
            )?
            .execute(params![self.run, device, reason])?;
        }
        tx.commit()
    }

    /// Marks a device whose readings the agent may drop on purpose (a flooding device over
    /// its rate limit): verify counts its missing readings as expected refusals.
    pub fn best_effort(&mut self, device: &str) -> rusqlite::Result<()> {
        self.conn.execute(
            "INSERT OR IGNORE INTO best_effort (run, device) VALUES (?1, ?2)",
            params![self.run, device],
        )?;
        Ok(())
    }

    /// The runs in a ledger, newest first.
    pub fn runs(path: &Path) -> rusqlite::Result<Vec<String>> {
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let mut st = conn.prepare("SELECT run FROM runs ORDER BY started_us DESC")?;
        st.query_map([], |r| r.get(0))?.collect()
    }

    /// What a run expects.
    pub fn expected(path: &Path, run: &str) -> rusqlite::Result<Expected> {
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let mut e = Expected::default();
        let mut st = conn.prepare("SELECT device, metric, ts_us FROM readings WHERE run = ?1")?;
        e.timed = st
            .query_map([run], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        let mut st = conn.prepare("SELECT device, metric, count FROM stamped WHERE run = ?1")?;
        e.stamped = st
            .query_map([run], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        let mut st =
            conn.prepare("SELECT reason, sum(count) FROM rejected WHERE run = ?1 GROUP BY reason")?;
        e.rejected = st
            .query_map([run], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut st = conn.prepare("SELECT device FROM best_effort WHERE run = ?1")?;
        e.best_effort = st
            .query_map([run], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(e)
    }
}
