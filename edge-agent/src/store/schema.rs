//! The queue file's SQLite schema and its version.

/// 2: the `seen` generations are keyed by (reading time, hash), so a commit's identities
/// land at the end of the tree rather than on random pages.
pub(super) const SCHEMA_VERSION: i64 = 2;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS devices (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
    evicted INTEGER NOT NULL DEFAULT 0, rate_limited INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY, device INTEGER NOT NULL, metric TEXT NOT NULL,
    tags TEXT NOT NULL DEFAULT '', UNIQUE (device, metric, tags));
CREATE TABLE IF NOT EXISTS readings (
    id INTEGER PRIMARY KEY AUTOINCREMENT, device INTEGER NOT NULL, series INTEGER NOT NULL,
    ts INTEGER NOT NULL, value INTEGER NOT NULL, seq INTEGER);
CREATE INDEX IF NOT EXISTS readings_by_device ON readings (device, id);
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
pub(super) fn upgrade_from_1() -> String {
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
    sql.push_str(&format!(
        "UPDATE meta SET value = {SCHEMA_VERSION} WHERE key = 'schema_version';"
    ));
    sql
}
