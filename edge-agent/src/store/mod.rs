//! The store-and-forward queue: readings wait in SQLite until the cloud acknowledges them.
//!
//! # On-disk schema (version 1)
//! ```sql
//! meta(key TEXT PRIMARY KEY, value)            -- schema_version, seen_current, seen_rotated_us
//! devices(id INTEGER PRIMARY KEY, name TEXT UNIQUE, evicted, rate_limited)   -- lifetime counters
//! series(id INTEGER PRIMARY KEY, device, metric, tags)   -- tags as canonical JSON ("" if none)
//! readings(id INTEGER PRIMARY KEY AUTOINCREMENT, device, series, ts, value, seq)
//!     -- value holds the f64's bits as an integer: SQLite turns a NaN REAL into NULL
//! readings_by_device ON readings(device, id)            -- eviction takes a device's oldest
//! seen0(h INTEGER PRIMARY KEY), seen1(h ...)            -- identity hashes, two generations
//! mqtt_msgs(id INTEGER PRIMARY KEY AUTOINCREMENT, pkid, hash, UNIQUE (pkid, hash))
//!     -- committed MQTT messages, newest MQTT_MSGS_KEEP kept
//! dead_letters(id INTEGER PRIMARY KEY AUTOINCREMENT, received_us, source, origin, reason,
//!              detail, size, payload)                    -- payload capped at 4 KiB
//! quarantine(id INTEGER PRIMARY KEY AUTOINCREMENT, at_us, reason, detail, device, metric,
//!            tags, ts, value, seq)     -- readings the cloud refused on their own
//! ```
//!
//! # Invariants
//! - A reading is in `readings` from the commit that stored it until the commit that
//!   deletes it on the cloud's ack, or evicts it (counted in `devices.evicted`). Devices
//!   are acknowledged only after the storing commit, so nothing acknowledged is lost.
//! - Ids only grow (`AUTOINCREMENT`), so a batch is an id range: acking it deletes exactly
//!   the readings it carried, whatever was stored since.
//! - Batches in flight live in memory only. After a restart every stored reading is unacked
//!   and will be read again; the cloud's idempotent writes make the replay harmless.
//! - Every committed MQTT message is remembered by (packet id, content hash) until the
//!   broker is known to have processed its PUBACK (a PINGRESP to a later PINGREQ), or
//!   [`MQTT_MSGS_KEEP`] newer ones were. A redelivery (DUP set) that matches is acknowledged
//!   without being stored again. Packet id alone is not enough: Mosquitto numbers messages
//!   when it queues them, so behind a long queue two unacknowledged messages of one session
//!   can share a packet id.
//! - A reading's identity is (tenant, device, metric, ts); `seq` takes no part. Each stored
//!   reading is remembered by a 64-bit hash of its identity, value bits and tags
//!   ([`identity_hash`], with the store's tenant) in the current `seen` generation.
//!   Generations rotate every dedupe window, and both are checked, so a *replay* (same
//!   identity, value and tags) is dropped for at least one window and at most two, across
//!   restarts. A *conflict* (same identity, another value or other tags) hashes differently
//!   and is stored and shipped: the cloud keeps the first value and reports it.
//! - A batch the cloud refuses (it cannot decode it, or it is over a limit) is not sent
//!   again whole: it is split in two, and the halves are sent again in the backlog lane, so
//!   the readings at fault are isolated in about log2(batch) round trips while the rest is
//!   delivered. A single reading the cloud refuses moves to `quarantine`, in the same
//!   transaction as its deletion from `readings`; `edge-agent queue dead-letters` shows it.
//!   Quarantine keeps the newest `dead_letters_keep` rows, as dead letters do.
//! - The queue holds at most `max_bytes / ROW_COST` readings. Past that, the oldest readings
//!   of the devices holding the most are evicted in the same transaction ([`evict::plan`]).

mod bloom;
pub mod evict;
mod identity;
mod read;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use plantlink_model::{Reading, Tags};
use plantlink_wire::frame::Lane;
use rusqlite::{Connection, OptionalExtension, params};

pub use identity::identity_hash;

/// Marks every dead letter of `reason` that kept its whole payload (MQTT ones: a CoAP
/// request's path is not kept) for replay by the agent; returns how many were marked and
/// how many cannot be replayed. A running agent replays them within a second, a stopped
/// one when it starts.
pub fn mark_for_replay(path: &Path, reason: &str) -> rusqlite::Result<(usize, usize)> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.execute_batch("CREATE TABLE IF NOT EXISTS replay_requests (id INTEGER PRIMARY KEY)")?;
    let marked = conn.execute(
        "INSERT OR IGNORE INTO replay_requests (id)
         SELECT id FROM dead_letters WHERE reason = ?1 AND source = 'mqtt' AND size <= length(payload)",
        [reason],
    )?;
    let cannot: i64 = conn.query_row(
        "SELECT count(*) FROM dead_letters WHERE reason = ?1 AND NOT (source = 'mqtt' AND size <= length(payload))",
        [reason],
        |r| r.get(0),
    )?;
    Ok((marked, cannot as usize))
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
pub use read::{
    DeadLetter, DeviceStats, Quarantined, QueueStats, dead_letters, open_read_only, quarantined,
    stats,
};

use crate::config::{Config, Synchronous};

/// Bytes of disk one queued reading is accounted at: the row, its index entry and page
/// slack, measured on the reference dataset (about 50 bytes) with headroom.
pub const ROW_COST: u64 = 64;

/// Committed MQTT messages remembered for recognising redeliveries: four times the packet
/// id space, so a message is forgotten only after its id has been reused four times.
pub const MQTT_MSGS_KEEP: i64 = 4 * 65_536;

/// Largest dead-letter payload kept, in bytes.
pub const DEAD_LETTER_PAYLOAD_CAP: usize = 4096;

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
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
CREATE TABLE IF NOT EXISTS seen0 (h INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS seen1 (h INTEGER PRIMARY KEY);
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

/// A queue error, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("queue {path}: {what}: {source}")]
    Sqlite {
        /// The queue file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// A row refers to a series that is not in the file.
    #[error("queue {path}: reading {id} refers to unknown series {series}; the file is damaged")]
    Damaged {
        /// The queue file.
        path: PathBuf,
        /// The reading's id.
        id: i64,
        /// The missing series.
        series: i64,
    },
    /// The file was written by a newer agent.
    #[error(
        "queue {path} has schema version {found}, newer than this agent's {SCHEMA_VERSION}; \
         upgrade edge-agent or point store.path at a new file"
    )]
    NewerSchema {
        /// The queue file.
        path: PathBuf,
        /// The version found.
        found: i64,
    },
}

/// How the queue is opened.
#[derive(Debug, Clone)]
pub struct Options {
    /// The SQLite file.
    pub path: PathBuf,
    /// The size bound.
    pub max_bytes: u64,
    /// SQLite `synchronous`.
    pub synchronous: Synchronous,
    /// The dedupe window.
    pub dedupe_window_us: i64,
    /// How many dead letters to keep.
    pub dead_letters_keep: u64,
    /// The tenant put on readings read back.
    pub tenant: String,
    /// Most series (metric and tags) one device may have in the queue.
    pub max_series_per_device: usize,
    /// Most committed readings kept in memory for the live lane ([`LIVE_BUFFER`]); past it
    /// the live lane reads SQLite until it has caught up. 0: always read SQLite.
    pub live_buffer: usize,
}

/// How many committed readings the live lane keeps in memory by default: at 25,000
/// readings/s, more than half a second of intake, about 4 MiB.
pub const LIVE_BUFFER: usize = 16_384;

impl Options {
    /// The queue options of an agent config.
    pub fn from_config(c: &Config) -> Self {
        Self {
            path: c.store.path.clone(),
            max_bytes: c.store.max_bytes.0,
            synchronous: c.store.synchronous,
            dedupe_window_us: (c.dedupe.window_secs as i64).saturating_mul(1_000_000),
            dead_letters_keep: c.store.dead_letters_keep,
            tenant: c.gateway.tenant.clone(),
            max_series_per_device: c.devices.max_series_per_device,
            live_buffer: LIVE_BUFFER,
        }
    }
}

/// What became of one reading offered to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    /// Stored.
    Stored,
    /// A replay of a reading stored within the dedupe window (same identity, value and
    /// tags); dropped.
    Duplicate,
    /// A new series (metric and tags) of a device that has `max_series_per_device`; not
    /// stored.
    SeriesCap,
}

/// Readings evicted from one device by a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eviction {
    /// The device.
    pub device: String,
    /// How many of its oldest readings went.
    pub readings: u64,
}

/// What became of a batch the cloud refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Refused {
    /// The batch was no longer in flight (a reconnect forgot it), or its readings were
    /// evicted meanwhile.
    Unknown,
    /// Split in two; both halves wait in the backlog lane.
    Split {
        /// Readings in the first half.
        first: usize,
        /// Readings in the second half.
        second: usize,
    },
    /// One reading is left of a larger batch (the others were evicted meanwhile): it is not
    /// known to be at fault, so it waits to be sent again alone.
    Again,
    /// A single reading, now in quarantine.
    Quarantined(Box<Reading>),
}

/// A batch read from the queue and now in flight.
#[derive(Debug, Clone)]
pub struct QueuedBatch {
    /// The batch's id, for [`Store::ack`].
    pub id: u64,
    /// Live or backlog.
    pub lane: Lane,
    /// The readings, oldest first.
    pub readings: Vec<Reading>,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    first: i64,
    last: i64,
    /// Readings sent in the batch (0 for a range waiting in `retry`).
    sent: usize,
}

#[derive(Debug)]
struct DeviceState {
    name: String,
    readings: u64,
    /// Wall-clock time of its last stored reading (0 when loaded from the file).
    last_us: i64,
    /// Its series rows.
    series: usize,
}

#[derive(Debug)]
struct SeriesState {
    device: i64,
    metric: String,
    tags: Tags,
    /// Bytes of its canonical tags, for [`series_cost`].
    tags_len: usize,
    readings: u64,
    last_us: i64,
}

/// Bytes of disk a `devices` row is accounted at: the row and its unique index entry.
fn device_cost(name: &str) -> u64 {
    48 + 2 * name.len() as u64
}

/// Bytes of disk a `series` row is accounted at: the row and its unique index entry.
fn series_cost(metric: &str, tags_len: usize) -> u64 {
    48 + 2 * (metric.len() + tags_len) as u64
}

/// The open queue. One owner (the agent's writer thread) does all reads and writes.
pub struct Store {
    conn: Connection,
    opts: Options,
    max_readings: u64,
    device_ids: HashMap<String, i64>,
    devices: HashMap<i64, DeviceState>,
    series_ids: HashMap<(i64, String, String), i64>,
    series: HashMap<i64, SeriesState>,
    /// Bytes accounted to `devices` and `series` rows.
    state_bytes: u64,
    /// Wall-clock time of the open transaction.
    txn_us: i64,
    total: u64,
    last_id: i64,
    seen_current: u8,
    seen_rotated_us: i64,
    in_txn: bool,
    rate_limited: HashMap<i64, u64>,
    dead_letters_last: i64,
    mqtt_msgs_last: i64,
    // Lanes: ids <= boundary are backlog. Each cursor is the last id handed out.
    boundary: i64,
    live_cursor: i64,
    backlog_cursor: i64,
    in_flight: BTreeMap<u64, InFlight>,
    next_batch: u64,
    // Id ranges of refused batches' halves, sent again (in the backlog lane) before the rest.
    retry: std::collections::VecDeque<InFlight>,
    // The live lane's readings in memory: committed, with ids > live_cursor, in id order.
    // When `live_complete`, it holds every stored reading past the cursor and each commit
    // adds its own; otherwise (it overflowed, or a commit evicted) it holds a prefix or
    // nothing, and the live lane reads SQLite past it until it has caught up.
    live_mem: std::collections::VecDeque<(i64, Reading)>,
    live_complete: bool,
    // The readings of the open transaction, for `live_mem` once it commits.
    live_pending: Vec<(i64, Reading)>,
    // The write front of the open transaction: its readings and the identity hashes it
    // adds to the current `seen` generation, written together (sorted, several rows per
    // statement) when it commits. Ids are assigned here, from `next_id`.
    rows_pending: Vec<Row>,
    // (id, packet id, hash) of the MQTT messages of the open transaction.
    mqtt_pending: Vec<(i64, u16, i64)>,
    seen_front: std::collections::HashSet<i64>,
    next_id: i64,
    // A Bloom filter per `seen` generation: most fresh readings need no lookup.
    blooms: [bloom::Bloom; 2],
    // The generation emptied by the open transaction's rotation (its filter is rebuilt if
    // the transaction rolls back).
    rotated: Option<u8>,
    front_sql: FrontSql,
}

/// A reading row waiting for its commit.
#[derive(Debug, Clone, Copy)]
struct Row {
    id: i64,
    device: i64,
    series: i64,
    ts: i64,
    bits: i64,
    seq: Option<i64>,
}

/// Binds a multi-row statement's parameters one after another.
struct Binder<'a, 'c> {
    st: &'a mut rusqlite::CachedStatement<'c>,
    next: usize,
}

impl Binder<'_, '_> {
    fn bind(&mut self, v: impl rusqlite::ToSql) -> rusqlite::Result<()> {
        self.st.raw_bind_parameter(self.next, v)?;
        self.next += 1;
        Ok(())
    }
}

/// Rows per multi-row INSERT, largest first: a flush takes as many of the largest as fit.
const CHUNKS: [usize; 3] = [128, 16, 1];

/// `INSERT INTO <table> (<columns>) VALUES (?, ...), ...` with `rows` rows.
fn multi_insert(head: &str, columns: usize, rows: usize) -> String {
    let one = format!("({})", vec!["?"; columns].join(", "));
    format!("{head} VALUES {}", vec![one; rows].join(", "))
}

/// One table's multi-row INSERT statements, one per [`CHUNKS`] size, built once.
#[derive(Debug)]
struct MultiInsert([String; CHUNKS.len()]);

impl MultiInsert {
    fn new(head: &str, columns: usize) -> Self {
        Self(CHUNKS.map(|n| multi_insert(head, columns, n)))
    }
}

/// The write front's statements.
#[derive(Debug)]
struct FrontSql {
    seen: [MultiInsert; 2],
    mqtt: MultiInsert,
    readings: MultiInsert,
}

impl FrontSql {
    fn new() -> Self {
        Self {
            seen: [0, 1]
                .map(|g| MultiInsert::new(&format!("INSERT OR IGNORE INTO seen{g} (h)"), 1)),
            mqtt: MultiInsert::new("INSERT OR REPLACE INTO mqtt_msgs (id, pkid, hash)", 3),
            readings: MultiInsert::new(
                "INSERT INTO readings (id, device, series, ts, value, seq)",
                6,
            ),
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.opts.path)
            .field("readings", &self.total)
            .finish_non_exhaustive()
    }
}

fn tags_key(tags: &Tags) -> String {
    if tags.is_empty() {
        String::new()
    } else {
        serde_json::to_string(tags).unwrap_or_default()
    }
}

impl Store {
    /// Opens (creating if needed) the queue file.
    pub fn open(opts: Options) -> Result<Self, StoreError> {
        let path = opts.path.clone();
        let err = |what| {
            let path = path.clone();
            move |source| StoreError::Sqlite { path, what, source }
        };
        let conn = Connection::open(&opts.path).map_err(err("opening"))?;
        // Every statement of the write path stays prepared (rusqlite keeps 16 by default,
        // fewer than the queue uses).
        conn.set_prepared_statement_cache_capacity(64);
        let sync = match opts.synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        };
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; PRAGMA busy_timeout = 5000;
             PRAGMA cache_size = -4096; PRAGMA temp_store = MEMORY;"
        ))
        .map_err(err("setting pragmas"))?;
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
                return Err(StoreError::NewerSchema { path, found: v });
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
        let max_readings = (opts.max_bytes / ROW_COST).max(1);
        let mut store = Self {
            conn,
            opts,
            max_readings,
            device_ids: HashMap::new(),
            devices: HashMap::new(),
            series_ids: HashMap::new(),
            series: HashMap::new(),
            state_bytes: 0,
            txn_us: 0,
            total: 0,
            last_id: 0,
            seen_current: 0,
            seen_rotated_us: 0,
            in_txn: false,
            rate_limited: HashMap::new(),
            dead_letters_last: 0,
            mqtt_msgs_last: 0,
            boundary: 0,
            live_cursor: 0,
            backlog_cursor: 0,
            in_flight: BTreeMap::new(),
            next_batch: 1,
            retry: std::collections::VecDeque::new(),
            live_mem: std::collections::VecDeque::new(),
            live_complete: true,
            live_pending: Vec::new(),
            rows_pending: Vec::new(),
            mqtt_pending: Vec::new(),
            seen_front: std::collections::HashSet::new(),
            next_id: 1,
            blooms: [bloom::Bloom::default(), bloom::Bloom::default()],
            rotated: None,
            front_sql: FrontSql::new(),
        };
        store.load()?;
        for g in 0..2 {
            store.fill_bloom(g)?;
        }
        store.restart_lanes();
        Ok(store)
    }

    fn sql_err(&self, what: &'static str) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Sqlite {
            path: self.opts.path.clone(),
            what,
            source,
        }
    }

    /// Rebuilds the in-memory indexes and counts from the file.
    fn load(&mut self) -> Result<(), StoreError> {
        let e = |source| StoreError::Sqlite {
            path: self.opts.path.clone(),
            what: "loading the queue",
            source,
        };
        self.device_ids.clear();
        self.devices.clear();
        self.series_ids.clear();
        self.series.clear();
        self.state_bytes = 0;
        let mut stmt = self
            .conn
            .prepare("SELECT id, name FROM devices")
            .map_err(e)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
            .map_err(e)?;
        for row in rows {
            let (id, name) = row.map_err(e)?;
            self.state_bytes += device_cost(&name);
            self.device_ids.insert(name.clone(), id);
            self.devices.insert(
                id,
                DeviceState {
                    name,
                    readings: 0,
                    last_us: 0,
                    series: 0,
                },
            );
        }
        drop(stmt);
        let mut stmt = self
            .conn
            .prepare("SELECT id, device, metric, tags FROM series")
            .map_err(e)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })
            .map_err(e)?;
        for row in rows {
            let (id, device, metric, tags) = row.map_err(e)?;
            let parsed: Tags = if tags.is_empty() {
                Tags::new()
            } else {
                serde_json::from_str(&tags).unwrap_or_default()
            };
            self.state_bytes += series_cost(&metric, tags.len());
            if let Some(d) = self.devices.get_mut(&device) {
                d.series += 1;
            }
            self.series.insert(
                id,
                SeriesState {
                    device,
                    metric: metric.clone(),
                    tags: parsed,
                    tags_len: tags.len(),
                    readings: 0,
                    last_us: 0,
                },
            );
            self.series_ids.insert((device, metric, tags), id);
        }
        drop(stmt);
        let mut stmt = self
            .conn
            .prepare("SELECT device, count(*) FROM readings GROUP BY device")
            .map_err(e)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
            .map_err(e)?;
        let mut total = 0;
        let mut counts = Vec::new();
        for row in rows {
            let (device, n) = row.map_err(e)?;
            counts.push((device, n as u64));
            total += n as u64;
        }
        drop(stmt);
        for (device, n) in counts {
            if let Some(d) = self.devices.get_mut(&device) {
                d.readings = n;
            }
        }
        let mut stmt = self
            .conn
            .prepare("SELECT series, count(*) FROM readings GROUP BY series")
            .map_err(e)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
            .map_err(e)?;
        let mut counts = Vec::new();
        for row in rows {
            counts.push(row.map_err(e)?);
        }
        drop(stmt);
        for (series, n) in counts {
            if let Some(st) = self.series.get_mut(&series) {
                st.readings = n as u64;
            }
        }
        self.total = total;
        self.last_id = self
            .conn
            .query_row("SELECT coalesce(max(id), 0) FROM readings", [], |r| {
                r.get(0)
            })
            .map_err(e)?;
        // AUTOINCREMENT never reuses an id: the next is past the highest ever given.
        let given: i64 = self
            .conn
            .query_row(
                "SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'readings'",
                [],
                |r| r.get(0),
            )
            .map_err(e)?;
        self.next_id = given.max(self.last_id) + 1;
        self.dead_letters_last = self
            .conn
            .query_row("SELECT coalesce(max(id), 0) FROM dead_letters", [], |r| {
                r.get(0)
            })
            .map_err(e)?;
        self.mqtt_msgs_last = self
            .conn
            .query_row(
                "SELECT max(coalesce((SELECT max(id) FROM mqtt_msgs), 0),
                            coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'mqtt_msgs'), 0))",
                [],
                |r| r.get(0),
            )
            .map_err(e)?;

        let meta = |key: &str| -> Result<Option<i64>, StoreError> {
            self.conn
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
                .map_err(e)
        };
        self.seen_current = meta("seen_current")?.unwrap_or(0) as u8 & 1;
        self.seen_rotated_us = meta("seen_rotated_us")?.unwrap_or(0);
        self.rate_limited.clear();
        Ok(())
    }

    /// Readings in the queue.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// Whether the queue is empty.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Bytes accounted to the queue: [`ROW_COST`] per reading, and the device and series
    /// rows at their size.
    pub fn bytes(&self) -> u64 {
        self.total * ROW_COST + self.state_bytes
    }

    /// The most readings the queue holds now before it evicts: what `max_bytes` leaves
    /// after the device and series rows.
    pub fn capacity(&self) -> u64 {
        self.reading_budget()
    }

    fn reading_budget(&self) -> u64 {
        let left = self.opts.max_bytes.saturating_sub(self.state_bytes) / ROW_COST;
        left.min(self.max_readings).max(1)
    }

    /// Devices the queue tracks (with readings waiting, or not yet pruned).
    pub fn devices(&self) -> usize {
        self.devices.len()
    }

    /// Whether `device` is tracked.
    pub fn knows(&self, device: &str) -> bool {
        self.device_ids.contains_key(device)
    }

    /// Forgets, inside a transaction, the devices and series that hold no readings and
    /// stored none since `before_us` (wall clock): their rows would otherwise grow without
    /// bound as device ids come and go. The devices' lifetime eviction and rate-limit counts
    /// are added to the queue's totals first. Returns (devices, series) pruned.
    pub fn prune_idle(&mut self, before_us: i64) -> Result<(usize, usize), StoreError> {
        debug_assert!(self.in_txn, "prune outside a transaction");
        let idle_series: Vec<i64> = self
            .series
            .iter()
            .filter(|(_, st)| st.readings == 0 && st.last_us < before_us)
            .map(|(&id, _)| id)
            .collect();
        for id in &idle_series {
            self.conn
                .prepare_cached("DELETE FROM series WHERE id = ?1")
                .and_then(|mut s| s.execute([id]))
                .map_err(self.sql_err("pruning idle series"))?;
            if let Some(st) = self.series.remove(id) {
                self.state_bytes = self
                    .state_bytes
                    .saturating_sub(series_cost(&st.metric, st.tags_len));
                if let Some(d) = self.devices.get_mut(&st.device) {
                    d.series = d.series.saturating_sub(1);
                }
                let tags = tags_key(&st.tags);
                self.series_ids.remove(&(st.device, st.metric, tags));
            }
        }
        let idle_devices: Vec<i64> = self
            .devices
            .iter()
            .filter(|(id, d)| {
                d.readings == 0 && d.last_us < before_us && !self.rate_limited.contains_key(id)
            })
            .map(|(&id, _)| id)
            .collect();
        for id in &idle_devices {
            self.conn
                .prepare_cached(
                    "INSERT INTO meta (key, value)
                     SELECT 'pruned_' || k, v FROM (
                       SELECT 'evicted' AS k, evicted AS v FROM devices WHERE id = ?1
                       UNION ALL SELECT 'rate_limited', rate_limited FROM devices WHERE id = ?1)
                     WHERE true
                     ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
                )
                .and_then(|mut s| s.execute([id]))
                .map_err(self.sql_err("pruning idle devices"))?;
            self.conn
                .prepare_cached("DELETE FROM devices WHERE id = ?1")
                .and_then(|mut s| s.execute([id]))
                .map_err(self.sql_err("pruning idle devices"))?;
            if let Some(d) = self.devices.remove(id) {
                self.state_bytes = self.state_bytes.saturating_sub(device_cost(&d.name));
                self.device_ids.remove(&d.name);
            }
        }
        Ok((idle_devices.len(), idle_series.len()))
    }

    /// Stores the schema set from the registry, replacing the one before (in a transaction
    /// of its own).
    pub fn save_schema_set(
        &mut self,
        version: u64,
        entries: &[plantlink_schema::Entry],
    ) -> Result<(), StoreError> {
        let body = serde_json::json!({ "version": version, "schemas": entries }).to_string();
        self.conn
            .execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_set', ?1)",
                [body],
            )
            .map_err(self.sql_err("storing the schema set"))?;
        Ok(())
    }

    /// The schema set last stored: its version and entries.
    pub fn schema_set(&self) -> Result<Option<(u64, Vec<plantlink_schema::Entry>)>, StoreError> {
        schema_set(&self.conn).map_err(self.sql_err("reading the schema set"))
    }

    /// Dead letters marked for replay (`edge-agent queue replay-dead-letters`), oldest first.
    pub fn replay_pending(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.conn
            .prepare_cached(
                "SELECT d.id, d.received_us, d.source, d.origin, d.reason, d.detail, d.size, d.payload
                 FROM replay_requests r JOIN dead_letters d ON d.id = r.id ORDER BY d.id LIMIT ?1",
            )
            .and_then(|mut s| s.query_map([limit as i64], read::dead_letter_row)?.collect())
            .map_err(self.sql_err("reading dead letters to replay"))
    }

    /// Marks the dead letters of `origin` with one of `reasons` for replay; returns how many.
    pub fn mark_replay(&mut self, origin: &str, reasons: &[&str]) -> Result<usize, StoreError> {
        let mut n = 0;
        for reason in reasons {
            n += self
                .conn
                .prepare_cached(
                    "INSERT OR IGNORE INTO replay_requests (id)
                     SELECT id FROM dead_letters WHERE origin = ?1 AND reason = ?2
                       AND source = 'mqtt' AND size <= length(payload)",
                )
                .and_then(|mut s| s.execute([origin, reason]))
                .map_err(self.sql_err("marking dead letters for replay"))?;
        }
        Ok(n)
    }

    /// Forgets replay requests whose dead letters cannot be replayed (they stay dead letters).
    pub fn unmark_replay(&mut self, ids: &[i64]) -> Result<(), StoreError> {
        for id in ids {
            self.conn
                .prepare_cached("DELETE FROM replay_requests WHERE id = ?1")
                .and_then(|mut s| s.execute([id]))
                .map_err(self.sql_err("forgetting a replay request"))?;
        }
        Ok(())
    }

    /// Forgets replayed dead letters and their requests (in the open transaction), and
    /// requests whose dead letter is gone.
    pub fn replayed(&mut self, ids: &[i64]) -> Result<(), StoreError> {
        for id in ids {
            self.conn
                .prepare_cached("DELETE FROM dead_letters WHERE id = ?1")
                .and_then(|mut s| s.execute([id]))
                .map_err(self.sql_err("forgetting a replayed dead letter"))?;
            self.conn
                .prepare_cached("DELETE FROM replay_requests WHERE id = ?1")
                .and_then(|mut s| s.execute([id]))
                .map_err(self.sql_err("forgetting a replayed dead letter"))?;
        }
        self.conn
            .execute(
                "DELETE FROM replay_requests WHERE id NOT IN (SELECT id FROM dead_letters)",
                [],
            )
            .map_err(self.sql_err("forgetting replay requests"))?;
        Ok(())
    }

    /// The connection, for read-only queries such as [`stats`].
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Starts a write transaction. `now_us` is wall-clock time, used to rotate the dedupe
    /// generations.
    pub fn begin(&mut self, now_us: i64) -> Result<(), StoreError> {
        if self.in_txn || !self.conn.is_autocommit() {
            // A transaction left open by an earlier error: undo it and reload.
            self.rollback();
        }
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(self.sql_err("beginning a transaction"))?;
        self.in_txn = true;
        self.txn_us = now_us;
        if now_us.saturating_sub(self.seen_rotated_us) >= self.opts.dedupe_window_us {
            let next = 1 - self.seen_current;
            let r = self
                .conn
                .execute_batch(&format!(
                    "DELETE FROM seen{next};
                     INSERT OR REPLACE INTO meta (key, value) VALUES ('seen_current', {next});
                     INSERT OR REPLACE INTO meta (key, value) VALUES ('seen_rotated_us', {now_us});"
                ))
                .map_err(self.sql_err("rotating the dedupe generations"));
            if let Err(e) = r {
                self.rollback();
                return Err(e);
            }
            // The generation that begins is sized for as much as the one that ended held.
            let expected = self.blooms[self.seen_current as usize].added();
            self.seen_current = next;
            self.seen_rotated_us = now_us;
            self.blooms[next as usize] = bloom::Bloom::for_hashes(expected);
            self.rotated = Some(next);
        }
        Ok(())
    }

    fn device_id(&mut self, name: &str) -> Result<i64, StoreError> {
        if let Some(&id) = self.device_ids.get(name) {
            return Ok(id);
        }
        self.conn
            .prepare_cached("INSERT INTO devices (name) VALUES (?1)")
            .and_then(|mut s| s.execute([name]))
            .map_err(self.sql_err("adding a device"))?;
        let id = self.conn.last_insert_rowid();
        self.state_bytes += device_cost(name);
        self.device_ids.insert(name.to_owned(), id);
        self.devices.insert(
            id,
            DeviceState {
                name: name.to_owned(),
                readings: 0,
                last_us: self.txn_us,
                series: 0,
            },
        );
        Ok(id)
    }

    fn series_id(&mut self, device: i64, r: &Reading) -> Result<i64, StoreError> {
        let tags = tags_key(&r.tags);
        let key = (device, r.metric.clone(), tags);
        if let Some(&id) = self.series_ids.get(&key) {
            return Ok(id);
        }
        self.conn
            .prepare_cached("INSERT INTO series (device, metric, tags) VALUES (?1, ?2, ?3)")
            .and_then(|mut s| s.execute(params![device, key.1, key.2]))
            .map_err(self.sql_err("adding a series"))?;
        let id = self.conn.last_insert_rowid();
        self.state_bytes += series_cost(&r.metric, key.2.len());
        if let Some(d) = self.devices.get_mut(&device) {
            d.series += 1;
        }
        self.series.insert(
            id,
            SeriesState {
                device,
                metric: r.metric.clone(),
                tags: r.tags.clone(),
                tags_len: key.2.len(),
                readings: 0,
                last_us: self.txn_us,
            },
        );
        self.series_ids.insert(key, id);
        Ok(id)
    }

    /// Puts every hash of generation `g` in its filter.
    fn fill_bloom(&mut self, g: u8) -> Result<(), StoreError> {
        let held: i64 = self
            .conn
            .query_row(&format!("SELECT count(*) FROM seen{g}"), [], |r| r.get(0))
            .map_err(self.sql_err("loading the dedupe filter"))?;
        let mut b = bloom::Bloom::for_hashes(held.max(0) as u64);
        let mut st = self
            .conn
            .prepare(&format!("SELECT h FROM seen{g}"))
            .map_err(self.sql_err("loading the dedupe filter"))?;
        let rows = st
            .query_map([], |r| r.get::<_, i64>(0))
            .map_err(self.sql_err("loading the dedupe filter"))?;
        for h in rows {
            b.add(h.map_err(self.sql_err("loading the dedupe filter"))?);
        }
        drop(st);
        self.blooms[g as usize] = b;
        Ok(())
    }

    /// Whether the identity was stored within the window; records it (in the write front)
    /// if not.
    fn first_sighting(&mut self, h: i64) -> Result<bool, StoreError> {
        if self.seen_front.contains(&h) {
            return Ok(false);
        }
        if !self.blooms[0].maybe(h) && !self.blooms[1].maybe(h) {
            self.seen_front.insert(h);
            self.blooms[self.seen_current as usize].add(h);
            return Ok(true);
        }
        let seen = self
            .conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM seen0 WHERE h = ?1)
                     OR EXISTS (SELECT 1 FROM seen1 WHERE h = ?1)",
            )
            .and_then(|mut s| s.query_row([h], |r| r.get::<_, bool>(0)))
            .map_err(self.sql_err("checking for duplicates"))?;
        if seen {
            return Ok(false);
        }
        self.seen_front.insert(h);
        self.blooms[self.seen_current as usize].add(h);
        Ok(true)
    }

    /// Writes the open transaction's front: its identity hashes, sorted, and its readings,
    /// in id order, several rows per statement.
    fn flush_front(&mut self) -> Result<(), StoreError> {
        let mut hashes: Vec<i64> = self.seen_front.drain().collect();
        hashes.sort_unstable();
        let sql = &self.front_sql;
        self.insert_rows(
            &sql.seen[self.seen_current as usize],
            "recording identities",
            &hashes,
            |b, h| b.bind(h),
        )?;
        // In order: a repeat replaces the record before it, as it would one by one.
        let msgs = std::mem::take(&mut self.mqtt_pending);
        self.insert_rows(&sql.mqtt, "recording MQTT messages", &msgs, |b, m| {
            b.bind(m.0)?;
            b.bind(m.1)?;
            b.bind(m.2)
        })?;
        let rows = std::mem::take(&mut self.rows_pending);
        self.insert_rows(&sql.readings, "storing readings", &rows, |b, r| {
            b.bind(r.id)?;
            b.bind(r.device)?;
            b.bind(r.series)?;
            b.bind(r.ts)?;
            b.bind(r.bits)?;
            b.bind(r.seq)
        })
    }

    /// Inserts `items` with `sql`, as many rows per statement as [`CHUNKS`] allows; `bind`
    /// binds one item's columns in order.
    fn insert_rows<T>(
        &self,
        sql: &MultiInsert,
        what: &'static str,
        items: &[T],
        bind: impl Fn(&mut Binder<'_, '_>, &T) -> rusqlite::Result<()>,
    ) -> Result<(), StoreError> {
        let mut at = 0;
        while at < items.len() {
            // CHUNKS ends with 1, so some size fits.
            let i = CHUNKS
                .iter()
                .position(|c| *c <= items.len() - at)
                .unwrap_or(CHUNKS.len() - 1);
            let n = CHUNKS[i];
            let mut st = self
                .conn
                .prepare_cached(&sql.0[i])
                .map_err(self.sql_err(what))?;
            let mut b = Binder {
                st: &mut st,
                next: 1,
            };
            for item in &items[at..at + n] {
                bind(&mut b, item).map_err(self.sql_err(what))?;
            }
            st.raw_execute().map_err(self.sql_err(what))?;
            at += n;
        }
        Ok(())
    }

    /// Offers one reading, inside a transaction.
    pub fn insert(&mut self, r: &Reading) -> Result<Insert, StoreError> {
        debug_assert!(self.in_txn, "insert outside a transaction");
        // A new series of a device at its cap is refused before anything is recorded (a
        // refused reading must not count as seen).
        if let Some(&device) = self.device_ids.get(&r.device)
            && self
                .devices
                .get(&device)
                .is_some_and(|d| d.series >= self.opts.max_series_per_device)
            && !self
                .series_ids
                .contains_key(&(device, r.metric.clone(), tags_key(&r.tags)))
        {
            return Ok(Insert::SeriesCap);
        }
        if !self.first_sighting(identity_hash(&self.opts.tenant, r))? {
            return Ok(Insert::Duplicate);
        }
        let device = self.device_id(&r.device)?;
        let series = self.series_id(device, r)?;
        self.last_id = self.next_id;
        self.next_id += 1;
        self.rows_pending.push(Row {
            id: self.last_id,
            device,
            series,
            ts: r.ts.0,
            bits: r.value.to_bits() as i64,
            seq: r.seq.map(|s| s as i64),
        });
        if self.live_complete {
            if self.live_mem.len() + self.live_pending.len() < self.opts.live_buffer {
                let mut kept = r.clone();
                kept.tenant.clone_from(&self.opts.tenant);
                self.live_pending.push((self.last_id, kept));
            } else {
                // Full: the memory keeps what it has (the oldest) and the live lane reads
                // the rest from SQLite, as after a commit that overflows it. (A rollback
                // leaves it so too, which only costs reads.)
                self.live_complete = false;
                self.live_pending = Vec::new();
            }
        }
        self.total += 1;
        if let Some(d) = self.devices.get_mut(&device) {
            d.readings += 1;
            d.last_us = self.txn_us;
        }
        if let Some(st) = self.series.get_mut(&series) {
            st.readings += 1;
            st.last_us = self.txn_us;
        }
        Ok(Insert::Stored)
    }

    /// The record of a committed MQTT message with this (packet id, payload hash), if any:
    /// a redelivery that matches is acknowledged without being stored again.
    pub fn mqtt_committed(&mut self, pkid: u16, hash: i64) -> Result<Option<i64>, StoreError> {
        // A redelivery in the same group as the message it repeats.
        if let Some(&(id, _, _)) = self
            .mqtt_pending
            .iter()
            .rev()
            .find(|m| (m.1, m.2) == (pkid, hash))
        {
            return Ok(Some(id));
        }
        self.conn
            .prepare_cached("SELECT id FROM mqtt_msgs WHERE pkid = ?1 AND hash = ?2")
            .and_then(|mut s| s.query_row(params![pkid, hash], |r| r.get(0)).optional())
            .map_err(self.sql_err("checking an MQTT redelivery"))
    }

    /// Records that the message with this packet id and payload hash is being committed
    /// (again as the newest, if it was known); returns the record's id.
    pub fn mqtt_record(&mut self, pkid: u16, hash: i64) -> Result<i64, StoreError> {
        self.mqtt_msgs_last += 1;
        self.mqtt_pending.push((self.mqtt_msgs_last, pkid, hash));
        Ok(self.mqtt_msgs_last)
    }

    /// Forgets MQTT message records whose PUBACK the broker is known to have processed:
    /// those messages can no longer be redelivered, and a stale record could only make a
    /// new message with the same packet id and content look like a redelivery.
    pub fn mqtt_forget(&mut self, ids: &[i64]) -> Result<(), StoreError> {
        for id in ids {
            self.conn
                .prepare_cached("DELETE FROM mqtt_msgs WHERE id = ?1")
                .and_then(|mut s| s.execute([id]))
                .map_err(self.sql_err("forgetting confirmed MQTT messages"))?;
        }
        Ok(())
    }

    /// Counts one reading of `device` dropped by the rate limiter.
    pub fn count_rate_limited(&mut self, device: &str) -> Result<(), StoreError> {
        let id = self.device_id(device)?;
        *self.rate_limited.entry(id).or_default() += 1;
        Ok(())
    }

    /// Records a dead letter, inside a transaction. `size` is the whole message's size, which
    /// is more than `payload` when only its first bytes were kept.
    #[allow(clippy::too_many_arguments)]
    pub fn dead_letter(
        &mut self,
        received_us: i64,
        source: &str,
        origin: &str,
        reason: &str,
        detail: &str,
        payload: &[u8],
        size: usize,
    ) -> Result<(), StoreError> {
        let kept = &payload[..payload.len().min(DEAD_LETTER_PAYLOAD_CAP)];
        self.conn
            .prepare_cached(
                "INSERT INTO dead_letters (received_us, source, origin, reason, detail, size, payload)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    received_us,
                    source,
                    origin,
                    reason,
                    detail,
                    size.max(payload.len()) as i64,
                    kept
                ])
            })
            .map_err(self.sql_err("storing a dead letter"))?;
        self.dead_letters_last = self.conn.last_insert_rowid();
        Ok(())
    }

    /// Evicts if over capacity, then commits. Returns what was evicted.
    pub fn commit(&mut self) -> Result<Vec<Eviction>, StoreError> {
        match self.finish() {
            Ok(ev) => Ok(ev),
            Err(e) => {
                self.rollback();
                Err(e)
            }
        }
    }

    fn finish(&mut self) -> Result<Vec<Eviction>, StoreError> {
        self.flush_front()?;
        let evictions = self.evict_over_capacity()?;
        for (device, n) in std::mem::take(&mut self.rate_limited) {
            self.conn
                .prepare_cached("UPDATE devices SET rate_limited = rate_limited + ?1 WHERE id = ?2")
                .and_then(|mut s| s.execute(params![n as i64, device]))
                .map_err(self.sql_err("counting rate-limited readings"))?;
        }
        let keep = self.opts.dead_letters_keep as i64;
        if self.dead_letters_last > keep {
            self.conn
                .prepare_cached("DELETE FROM dead_letters WHERE id <= ?1")
                .and_then(|mut s| s.execute([self.dead_letters_last - keep]))
                .map_err(self.sql_err("trimming dead letters"))?;
        }
        if self.mqtt_msgs_last > MQTT_MSGS_KEEP {
            self.conn
                .prepare_cached("DELETE FROM mqtt_msgs WHERE id <= ?1")
                .and_then(|mut s| s.execute([self.mqtt_msgs_last - MQTT_MSGS_KEEP]))
                .map_err(self.sql_err("trimming MQTT message records"))?;
        }
        self.conn
            .execute_batch("COMMIT")
            .map_err(self.sql_err("committing"))?;
        self.in_txn = false;
        self.rotated = None;
        self.committed_live(!evictions.is_empty());
        Ok(evictions)
    }

    /// The open transaction committed: its readings join the live lane's memory, unless it
    /// evicted (rows the memory holds may be gone) or the memory is full.
    fn committed_live(&mut self, evicted: bool) {
        let pending = std::mem::take(&mut self.live_pending);
        if evicted {
            self.live_mem.clear();
            self.live_complete = false;
            return;
        }
        if !self.live_complete {
            return;
        }
        if self.live_mem.len() + pending.len() > self.opts.live_buffer {
            // Keep what is there (the oldest), read the rest from SQLite.
            self.live_complete = false;
            return;
        }
        self.live_mem.extend(pending);
    }

    /// Abandons the open transaction and reloads the in-memory state from the file.
    pub fn rollback(&mut self) {
        self.live_pending.clear();
        self.rows_pending.clear();
        self.mqtt_pending.clear();
        self.seen_front.clear();
        if self.in_txn || !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
            self.in_txn = false;
        }
        if let Err(e) = self.load() {
            tracing::error!(error = %e, "reloading the queue after a rollback failed");
        }
        // A rotation undone: the generation it emptied holds its hashes again.
        if let Some(g) = self.rotated.take()
            && let Err(e) = self.fill_bloom(g)
        {
            tracing::error!(error = %e, "reloading the dedupe filter after a rollback failed");
            self.blooms[g as usize] = bloom::Bloom::default();
            // An empty filter would answer "not stored" wrongly: make it answer "maybe".
            self.blooms[g as usize].saturate();
        }
    }

    fn evict_over_capacity(&mut self) -> Result<Vec<Eviction>, StoreError> {
        let budget = self.reading_budget();
        if self.total <= budget {
            return Ok(Vec::new());
        }
        let need = self.total - budget;
        let ids: Vec<i64> = self.devices.keys().copied().collect();
        let counts: Vec<u64> = ids.iter().map(|id| self.devices[id].readings).collect();
        let plan = evict::plan(&counts, need);
        let mut out = Vec::new();
        for (&device, &n) in ids.iter().zip(&plan) {
            if n == 0 {
                continue;
            }
            let series: Vec<i64> = self
                .conn
                .prepare_cached(
                    "DELETE FROM readings WHERE id IN
                       (SELECT id FROM readings WHERE device = ?1 ORDER BY id LIMIT ?2)
                     RETURNING series",
                )
                .and_then(|mut s| {
                    s.query_map(params![device, n as i64], |r| r.get(0))?
                        .collect::<rusqlite::Result<_>>()
                })
                .map_err(self.sql_err("evicting readings"))?;
            let gone = series.len() as u64;
            for s in series {
                if let Some(st) = self.series.get_mut(&s) {
                    st.readings = st.readings.saturating_sub(1);
                }
            }
            self.conn
                .prepare_cached("UPDATE devices SET evicted = evicted + ?1 WHERE id = ?2")
                .and_then(|mut s| s.execute(params![gone as i64, device]))
                .map_err(self.sql_err("counting evictions"))?;
            let d = self.devices.get_mut(&device).expect("device of a count");
            d.readings -= gone;
            self.total -= gone;
            out.push(Eviction {
                device: d.name.clone(),
                readings: gone,
            });
        }
        Ok(out)
    }

    /// Forgets batches in flight and makes everything stored so far backlog: called when a
    /// connection to the cloud (re)starts, after which unacked readings are sent again.
    pub fn restart_lanes(&mut self) {
        debug_assert!(!self.in_txn, "lanes restarted inside a transaction");
        self.in_flight.clear();
        self.retry.clear();
        self.boundary = self.last_id;
        self.live_cursor = self.last_id;
        self.backlog_cursor = 0;
        self.live_mem.clear();
        self.live_mem.shrink_to(self.opts.live_buffer.min(1024));
        self.live_complete = true;
    }

    /// Live readings not yet read into a batch (an upper bound when some were evicted).
    pub fn live_waiting(&self) -> u64 {
        self.last_id
            .saturating_sub(self.live_cursor.max(self.boundary))
            .max(0) as u64
    }

    /// Whether backlog readings are waiting to be read.
    pub fn has_backlog(&self) -> bool {
        (self.backlog_cursor < self.boundary || !self.retry.is_empty()) && self.total > 0
    }

    /// Reads up to `max` readings of `lane`, oldest first, and puts them in flight.
    pub fn read_batch(
        &mut self,
        lane: Lane,
        max: usize,
    ) -> Result<Option<QueuedBatch>, StoreError> {
        assert!(!self.in_txn, "read_batch inside a write transaction");
        if lane == Lane::Backlog && max > 0 {
            while let Some(range) = self.retry.pop_front() {
                let rows = self.read_range(range.first - 1, range.last, max)?;
                let Some(&(last, _)) = rows.last() else {
                    continue; // evicted meanwhile
                };
                if last < range.last {
                    self.retry.push_front(InFlight {
                        first: last + 1,
                        last: range.last,
                        sent: 0,
                    });
                }
                let id = self.next_batch;
                self.next_batch += 1;
                self.in_flight.insert(
                    id,
                    InFlight {
                        first: range.first,
                        last,
                        sent: rows.len(),
                    },
                );
                return Ok(Some(QueuedBatch {
                    id,
                    lane,
                    readings: rows.into_iter().map(|(_, r)| r).collect(),
                }));
            }
        }
        let (after, upto) = match lane {
            Lane::Live => (self.live_cursor, i64::MAX),
            Lane::Backlog => (self.backlog_cursor, self.boundary),
        };
        if after >= upto || max == 0 {
            return Ok(None);
        }
        let rows = match lane {
            Lane::Live => self.read_live(max)?,
            Lane::Backlog => self.read_range(after, upto, max)?,
        };
        let Some(&(last, _)) = rows.last() else {
            // Nothing left in this lane up to its end: skip the empty stretch.
            if lane == Lane::Backlog {
                self.backlog_cursor = self.boundary;
            }
            return Ok(None);
        };
        match lane {
            Lane::Live => self.live_cursor = last,
            Lane::Backlog => self.backlog_cursor = last,
        }
        let id = self.next_batch;
        self.next_batch += 1;
        self.in_flight.insert(
            id,
            InFlight {
                first: after + 1,
                last,
                sent: rows.len(),
            },
        );
        Ok(Some(QueuedBatch {
            id,
            lane,
            readings: rows.into_iter().map(|(_, r)| r).collect(),
        }))
    }

    /// Up to `max` live readings past the cursor: from memory while it has them, else from
    /// SQLite; a read from SQLite that reaches the newest reading lets commits fill the
    /// memory again.
    fn read_live(&mut self, max: usize) -> Result<Vec<(i64, Reading)>, StoreError> {
        if !self.live_mem.is_empty() {
            let n = max.min(self.live_mem.len());
            let rows: Vec<(i64, Reading)> = self.live_mem.drain(..n).collect();
            debug_assert!(rows[0].0 > self.live_cursor);
            return Ok(rows);
        }
        if self.live_complete {
            return Ok(Vec::new());
        }
        let rows = self.read_range(self.live_cursor, i64::MAX, max)?;
        if rows.len() < max || rows.last().is_some_and(|r| r.0 >= self.last_id) {
            self.live_complete = true;
        }
        Ok(rows)
    }

    /// Live readings first, then backlog.
    pub fn read_next(&mut self, max: usize) -> Result<Option<QueuedBatch>, StoreError> {
        match self.read_batch(Lane::Live, max)? {
            Some(b) => Ok(Some(b)),
            None => self.read_batch(Lane::Backlog, max),
        }
    }

    fn read_range(
        &self,
        after: i64,
        upto: i64,
        max: usize,
    ) -> Result<Vec<(i64, Reading)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, series, ts, value, seq FROM readings
                 WHERE id > ?1 AND id <= ?2 ORDER BY id LIMIT ?3",
            )
            .map_err(self.sql_err("reading a batch"))?;
        let rows = stmt
            .query_map(params![after, upto, max as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                ))
            })
            .map_err(self.sql_err("reading a batch"))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, series, ts, bits, seq) = row.map_err(self.sql_err("reading a batch"))?;
            // Never skip a row: an ack covers the whole id range, so a skipped row would be
            // deleted without ever having been sent.
            let Some(SeriesState {
                device,
                metric,
                tags,
                ..
            }) = self.series.get(&series)
            else {
                return Err(StoreError::Damaged {
                    path: self.opts.path.clone(),
                    id,
                    series,
                });
            };
            let device = self
                .devices
                .get(device)
                .map(|d| d.name.clone())
                .unwrap_or_default();
            out.push((
                id,
                Reading {
                    tenant: self.opts.tenant.clone(),
                    device,
                    metric: metric.clone(),
                    ts: plantlink_model::Timestamp(ts),
                    value: f64::from_bits(bits as u64),
                    tags: tags.clone(),
                    seq: seq.map(|s| s as u64),
                },
            ));
        }
        Ok(out)
    }

    /// Deletes the readings of an acknowledged batch; returns how many were deleted
    /// (fewer than sent if some were evicted meanwhile). Unknown ids delete nothing.
    pub fn ack(&mut self, batch: u64) -> Result<u64, StoreError> {
        assert!(!self.in_txn, "ack inside a write transaction");
        let Some(f) = self.in_flight.remove(&batch) else {
            return Ok(0);
        };
        let mut stmt = self
            .conn
            .prepare_cached(
                "DELETE FROM readings WHERE id >= ?1 AND id <= ?2 RETURNING device, series",
            )
            .map_err(self.sql_err("deleting an acked batch"))?;
        let gone: Vec<(i64, i64)> = stmt
            .query_map(params![f.first, f.last], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|rows| rows.collect())
            .map_err(self.sql_err("deleting an acked batch"))?;
        drop(stmt);
        for &(device, series) in &gone {
            self.forget_one(device, series);
        }
        Ok(gone.len() as u64)
    }

    /// One reading of `device` in `series` left the queue.
    fn forget_one(&mut self, device: i64, series: i64) {
        if let Some(d) = self.devices.get_mut(&device) {
            d.readings = d.readings.saturating_sub(1);
        }
        if let Some(st) = self.series.get_mut(&series) {
            st.readings = st.readings.saturating_sub(1);
        }
        self.total = self.total.saturating_sub(1);
    }

    /// The cloud refused batch `batch` (`reason` is its code's label, `detail` its words):
    /// splits it, or quarantines it when it holds one reading. See the module's invariants.
    pub fn refuse(
        &mut self,
        batch: u64,
        reason: &str,
        detail: &str,
        now_us: i64,
    ) -> Result<Refused, StoreError> {
        assert!(!self.in_txn, "refuse inside a write transaction");
        let Some(f) = self.in_flight.remove(&batch) else {
            return Ok(Refused::Unknown);
        };
        let ids: Vec<i64> = self
            .conn
            .prepare_cached("SELECT id FROM readings WHERE id >= ?1 AND id <= ?2 ORDER BY id")
            .and_then(|mut s| {
                s.query_map(params![f.first, f.last], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()
            })
            .map_err(self.sql_err("reading a refused batch"))?;
        match ids.len() {
            0 => Ok(Refused::Unknown),
            // Only a reading refused on its own is at fault: one left of a larger batch
            // (the others evicted meanwhile) is sent again alone first.
            1 if f.sent > 1 => {
                self.retry.push_front(InFlight {
                    first: ids[0],
                    last: ids[0],
                    sent: 0,
                });
                Ok(Refused::Again)
            }
            1 => {
                let rows = self.read_range(ids[0] - 1, ids[0], 1)?;
                let (id, r) = rows.into_iter().next().expect("the row just found");
                self.quarantine(id, &r, reason, detail, now_us)?;
                Ok(Refused::Quarantined(Box::new(r)))
            }
            n => {
                let mid = n / 2;
                // The second half first, so that the first half ends up in front.
                self.retry.push_front(InFlight {
                    first: ids[mid],
                    last: f.last,
                    sent: 0,
                });
                self.retry.push_front(InFlight {
                    first: f.first,
                    last: ids[mid - 1],
                    sent: 0,
                });
                Ok(Refused::Split {
                    first: mid,
                    second: n - mid,
                })
            }
        }
    }

    fn quarantine(
        &mut self,
        id: i64,
        r: &Reading,
        reason: &str,
        detail: &str,
        now_us: i64,
    ) -> Result<(), StoreError> {
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(self.sql_err("quarantining a reading"))?;
        tx.prepare_cached(
            "INSERT INTO quarantine (at_us, reason, detail, device, metric, tags, ts, value, seq)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )
        .and_then(|mut s| {
            s.execute(params![
                now_us,
                reason,
                detail,
                r.device,
                r.metric,
                tags_key(&r.tags),
                r.ts.0,
                r.value,
                r.seq.map(|s| s as i64)
            ])
        })
        .map_err(self.sql_err("quarantining a reading"))?;
        let qid = tx.last_insert_rowid();
        let (device, series): (i64, i64) = tx
            .prepare_cached("DELETE FROM readings WHERE id = ?1 RETURNING device, series")
            .and_then(|mut s| s.query_row([id], |row| Ok((row.get(0)?, row.get(1)?))))
            .map_err(self.sql_err("quarantining a reading"))?;
        let keep = self.opts.dead_letters_keep as i64;
        if qid > keep {
            tx.prepare_cached("DELETE FROM quarantine WHERE id <= ?1")
                .and_then(|mut s| s.execute([qid - keep]))
                .map_err(self.sql_err("trimming the quarantine"))?;
        }
        tx.commit()
            .map_err(self.sql_err("quarantining a reading"))?;
        self.forget_one(device, series);
        Ok(())
    }

    /// Batches in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The timestamp of the oldest queued reading, if any.
    pub fn oldest_ts(&self) -> Result<Option<i64>, StoreError> {
        self.conn
            .query_row("SELECT ts FROM readings ORDER BY id LIMIT 1", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.sql_err("finding the oldest reading"))
    }

    /// The queue file's path.
    pub fn path(&self) -> &Path {
        &self.opts.path
    }
}
