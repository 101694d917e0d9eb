//! The queue file's SQLite schema and its version.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension};

use super::StoreError;

/// 2: the `seen` generations are keyed by (reading time, hash), so a commit's identities
/// land at the end of the tree rather than on random pages.
/// 3: readings are kept in batch-shaped rows, `chunks` ([`super::chunks`]).
pub const SCHEMA_VERSION: i64 = 3;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS devices (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
    evicted INTEGER NOT NULL DEFAULT 0, rate_limited INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY, device INTEGER NOT NULL, metric TEXT NOT NULL,
    tags TEXT NOT NULL DEFAULT '', UNIQUE (device, metric, tags));
CREATE TABLE IF NOT EXISTS chunks (
    last INTEGER PRIMARY KEY AUTOINCREMENT, first INTEGER NOT NULL, device INTEGER NOT NULL,
    body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_device ON chunks (device, last);
CREATE TABLE IF NOT EXISTS seen0 (
    ts INTEGER NOT NULL, h INTEGER NOT NULL, PRIMARY KEY (ts, h)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS seen1 (
    ts INTEGER NOT NULL, h INTEGER NOT NULL, PRIMARY KEY (ts, h)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mqtt_msgs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, pkid INTEGER NOT NULL, hash INTEGER NOT NULL,
    UNIQUE (pkid, hash));
CREATE TABLE IF NOT EXISTS replay_requests (id INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT, received_us INTEGER NOT NULL, source TEXT NOT NULL,
    origin TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL, size INTEGER NOT NULL,
    payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at_us INTEGER NOT NULL, reason TEXT NOT NULL,
    detail TEXT NOT NULL, device TEXT NOT NULL, metric TEXT NOT NULL, tags TEXT NOT NULL,
    ts INTEGER NOT NULL, value REAL, seq INTEGER);
";

/// The reading time given to identities carried over from a version 1 file, which kept the
/// hash alone; lookups ask for it beside the reading's own time until the generation that
/// holds them is emptied.
pub(super) const TS_UNKNOWN: i64 = i64::MIN;

/// Version 1 to 2: the `seen` generations take the (time, hash) key, their hashes kept
/// under [`TS_UNKNOWN`]. Run inside one transaction.
fn upgrade_from_1() -> String {
    let mut sql = String::new();
    for g in 0..2 {
        sql.push_str(&format!(
            "ALTER TABLE seen{g} RENAME TO seen{g}_v1;
             CREATE TABLE seen{g} (
                 ts INTEGER NOT NULL, h INTEGER NOT NULL, PRIMARY KEY (ts, h)) WITHOUT ROWID;
             INSERT INTO seen{g} (ts, h) SELECT {TS_UNKNOWN}, h FROM seen{g}_v1;
             DROP TABLE seen{g}_v1;"
        ));
    }
    sql.push_str("UPDATE meta SET value = 2 WHERE key = 'schema_version';");
    sql
}

/// Version 2 to 3: the `readings` rows become chunks, one per run of a device's readings
/// with consecutive ids, and the id sequence carries over. Run inside one transaction;
/// returns how many readings moved.
fn upgrade_from_2(conn: &Connection) -> rusqlite::Result<u64> {
    use super::chunks::{Entry, MAX_CHUNK, encode};
    let mut st =
        conn.prepare("SELECT id, device, series, ts, value, seq FROM readings ORDER BY id")?;
    let mut rows = st.query([])?;
    let mut insert =
        conn.prepare("INSERT INTO chunks (last, first, device, body) VALUES (?1, ?2, ?3, ?4)")?;
    let mut run: Vec<Entry> = Vec::new();
    let (mut first, mut last, mut device) = (0i64, 0i64, 0i64);
    let mut moved = 0u64;
    let mut flush = |run: &mut Vec<Entry>, first: i64, last: i64, device: i64| {
        if run.is_empty() {
            return Ok(());
        }
        insert.execute(rusqlite::params![last, first, device, encode(run)])?;
        run.clear();
        Ok::<(), rusqlite::Error>(())
    };
    while let Some(r) = rows.next()? {
        let (id, dev): (i64, i64) = (r.get(0)?, r.get(1)?);
        if !run.is_empty() && (dev != device || id != last + 1 || run.len() as i64 >= MAX_CHUNK) {
            flush(&mut run, first, last, device)?;
        }
        if run.is_empty() {
            first = id;
            device = dev;
        }
        last = id;
        run.push(Entry {
            series: r.get(2)?,
            ts: r.get(3)?,
            bits: r.get(4)?,
            seq: r.get(5)?,
        });
        moved += 1;
    }
    flush(&mut run, first, last, device)?;
    drop(rows);
    drop(st);
    // AUTOINCREMENT never gives an id again: the chunks' sequence starts where the readings'
    // ended.
    let given: i64 = conn.query_row(
        "SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'readings'",
        [],
        |r| r.get(0),
    )?;
    let updated = conn.execute(
        "UPDATE sqlite_sequence SET seq = max(seq, ?1) WHERE name = 'chunks'",
        [given],
    )?;
    if updated == 0 {
        conn.execute(
            "INSERT INTO sqlite_sequence (name, seq) VALUES ('chunks', ?1)",
            [given],
        )?;
    }
    conn.execute_batch(&format!(
        "DROP TABLE readings;
         UPDATE meta SET value = {SCHEMA_VERSION} WHERE key = 'schema_version';"
    ))?;
    Ok(moved)
}

/// The schema version recorded in a queue file (none in a file not yet set up).
pub fn schema_version(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    let has_meta: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta')",
        [],
        |r| r.get(0),
    )?;
    if !has_meta {
        return Ok(None);
    }
    conn.query_row(
        "SELECT value FROM meta WHERE key = 'schema_version'",
        [],
        |r| r.get(0),
    )
    .optional()
}

/// The schema set stored in a queue file: its version and entries. A stored set that no
/// longer parses (written by a newer agent) reads as none.
pub fn schema_set(
    conn: &Connection,
) -> rusqlite::Result<Option<(u64, Vec<plantlink_schema::Entry>)>> {
    #[derive(serde::Deserialize)]
    struct Stored {
        version: u64,
        schemas: Vec<plantlink_schema::Entry>,
    }
    let text: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'schema_set'", [], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(text
        .and_then(|t| serde_json::from_str::<Stored>(&t).ok())
        .map(|s| (s.version, s.schemas)))
}

/// Creates the schema in a new file, records its version, or upgrades an older file in
/// one transaction; refuses a file written by a newer agent.
pub(super) fn prepare(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let err = |what| {
        let path = path.to_path_buf();
        move |source| StoreError::Sqlite { path, what, source }
    };
    conn.execute_batch(SCHEMA)
        .map_err(err("creating the schema"))?;
    let version: Option<i64> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(err("reading the schema version"))?;
    match version {
        Some(v) if v > SCHEMA_VERSION => {
            return Err(StoreError::NewerSchema {
                path: path.to_path_buf(),
                found: v,
            });
        }
        Some(v @ (1 | 2)) => {
            tracing::info!(path = %path.display(), from = v, to = SCHEMA_VERSION,
                "upgrading the queue file");
            // All of it or none: the guard rolls back when dropped uncommitted.
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(err("upgrading the queue file's schema"))?;
            if v == 1 {
                tx.execute_batch(&upgrade_from_1())
                    .map_err(err("upgrading the schema from version 1"))?;
            }
            let moved = upgrade_from_2(&tx).map_err(err("upgrading the schema from version 2"))?;
            tx.commit()
                .map_err(err("upgrading the queue file's schema"))?;
            tracing::info!(path = %path.display(), readings = moved,
                "queue file upgraded");
        }
        Some(_) => {}
        None => {
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)",
                [SCHEMA_VERSION],
            )
            .map_err(err("writing the schema version"))?;
        }
    }
    Ok(())
}
