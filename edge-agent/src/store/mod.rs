//! The store-and-forward queue: readings wait in SQLite until the cloud acknowledges them.
//!
//! # On-disk schema (version 3)
//! ```sql
//! meta(key TEXT PRIMARY KEY, value)            -- schema_version, seen_current, seen_rotated_us,
//!                                              -- seen0_ts_max, seen1_ts_max (store/fresh.rs)
//! devices(id INTEGER PRIMARY KEY, name TEXT UNIQUE, evicted, rate_limited)   -- lifetime counters
//! series(id INTEGER PRIMARY KEY, device, metric, tags)   -- tags as canonical JSON ("" if none)
//! chunks(last INTEGER PRIMARY KEY AUTOINCREMENT, first, device, body)
//!     -- readings first..=last, all of one device, encoded in body (store/chunks.rs):
//!     -- series, time, the f64's bits (a NaN survives), seq
//! chunks_by_device ON chunks(device, last)              -- eviction takes a device's oldest
//! seen0(ts, h, PRIMARY KEY (ts, h)) WITHOUT ROWID, seen1(...)  -- identity hashes by reading
//!     -- time, two generations; a version 1 file's hashes are kept under ts = i64::MIN
//! mqtt_msgs(id INTEGER PRIMARY KEY AUTOINCREMENT, pkid, hash, UNIQUE (pkid, hash))
//!     -- committed MQTT messages, newest MQTT_MSGS_KEEP kept
//! dead_letters(id INTEGER PRIMARY KEY AUTOINCREMENT, received_us, source, origin, reason,
//!              detail, size, payload)                    -- payload capped at 4 KiB
//! quarantine(id INTEGER PRIMARY KEY AUTOINCREMENT, at_us, reason, detail, device, metric,
//!            tags, ts, value, seq)     -- readings the cloud refused on their own
//! ```
//!
//! # Invariants
//! - A reading is in `chunks` from the commit that stored it until the commit that
//!   deletes it on the cloud's ack, or evicts it (counted in `devices.evicted`). Devices
//!   are acknowledged only after the storing commit, so nothing acknowledged is lost.
//! - Ids only grow (`AUTOINCREMENT` on a chunk's last id), so a batch is an id range:
//!   acking it deletes exactly the readings it carried, whatever was stored since. A commit
//!   numbers its readings device by device, each device's in the order they came, so a
//!   device's readings of one commit are one chunk (up to [`chunks::MAX_CHUNK`]).
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
mod chunks;
mod dead_letters;
mod devices;
pub mod evict;
mod fresh;
mod front;
mod identity;
mod lanes;
mod load;
mod mqtt_records;
mod read;
mod schema;
#[cfg(test)]
mod tests;
mod uplink;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use plantlink_model::{Reading, Tags};
use plantlink_wire::frame::Lane;
use rusqlite::{Connection, OptionalExtension, params};

pub use dead_letters::{DEAD_LETTER_PAYLOAD_CAP, mark_for_replay};
use front::FrontSql;
pub use identity::identity_hash;
pub use mqtt_records::MQTT_MSGS_KEEP;
use schema::TS_UNKNOWN;
pub use schema::{SCHEMA_VERSION, schema_set, schema_version};

pub use read::{
    DeadLetter, DeviceStats, Quarantined, QueueStats, QueuedReading, dead_letter_reasons,
    dead_letters, open_read_only, quarantined, queued_readings, stats,
};

use crate::config::{Config, Synchronous};

/// Most readings one queue row holds: a commit keeps each device's readings in one row, in
/// rows of at most this many.
pub const READINGS_PER_ROW: usize = 128;

/// Bytes of disk one queued reading is accounted at: the row, its index entry and page
/// slack, measured on the reference dataset (about 50 bytes) with headroom.
pub const ROW_COST: u64 = 64;

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
    /// A chunk row does not decode.
    #[error(
        "queue {path}: the row holding readings {first}..={last} does not decode; the file \
         is damaged"
    )]
    DamagedChunk {
        /// The queue file.
        path: PathBuf,
        /// Its first reading's id.
        first: i64,
        /// Its last reading's id.
        last: i64,
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

#[derive(Debug)]
struct DeviceState {
    name: String,
    readings: u64,
    /// Wall-clock time of its last stored reading (0 when loaded from the file).
    last_us: i64,
    /// Its series rows.
    series: usize,
    /// Readings it sent while this process ran, stored or rate-limited (for the status
    /// page's rates; back to 0 when a rollback reloads the state).
    sent: u64,
}

#[derive(Debug)]
struct SeriesState {
    device: i64,
    metric: String,
    tags: Tags,
    /// Bytes of its canonical tags, for [`devices::series_cost`].
    tags_len: usize,
    readings: u64,
    last_us: i64,
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
    // Which ids each uplink lane reads next, and what is in flight.
    lanes: lanes::Lanes,
    // The live lane's readings in memory: committed, with ids > live_cursor, in id order.
    // When `live_complete`, it holds every stored reading past the cursor and each commit
    // adds its own; otherwise (it overflowed, or a commit evicted) it holds a prefix or
    // nothing, and the live lane reads SQLite past it until it has caught up.
    live_mem: std::collections::VecDeque<(i64, Reading)>,
    live_complete: bool,
    // The readings of the open transaction, for `live_mem` once it commits: all of them, in
    // the order of `rows_pending`, or none. Their ids are given at the commit.
    live_pending: Vec<(i64, Reading)>,
    // The write front of the open transaction: its readings and the identity hashes it
    // adds to the current `seen` generation, written together (sorted, several rows per
    // statement) when it commits. Ids are assigned then, from `next_id`.
    rows_pending: Vec<Row>,
    // (id, packet id, hash) of the MQTT messages of the open transaction.
    mqtt_pending: Vec<(i64, u16, i64)>,
    // (reading time, identity hash) of the readings it stores.
    seen_front: std::collections::HashSet<(i64, i64)>,
    next_id: i64,
    // A Bloom filter per `seen` generation: most fresh readings need no lookup.
    blooms: [bloom::Bloom; 2],
    // Readings newer than anything remembered of their (device, metric) need neither.
    fresh: fresh::Fresh,
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
        let mut conn = Connection::open(&opts.path).map_err(err("opening"))?;
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
        schema::prepare(&mut conn, &path)?;
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
            lanes: lanes::Lanes::default(),
            live_mem: std::collections::VecDeque::new(),
            live_complete: true,
            live_pending: Vec::new(),
            rows_pending: Vec::new(),
            mqtt_pending: Vec::new(),
            seen_front: std::collections::HashSet::new(),
            next_id: 1,
            blooms: [bloom::Bloom::default(), bloom::Bloom::default()],
            fresh: fresh::Fresh::new([fresh::UNKNOWN; 2]),
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
            // Its newest goes to `meta` with this transaction's front (`flush_front`).
            self.fresh.emptied(next);
            self.rotated = Some(next);
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
        if !self.first_sighting(identity_hash(&self.opts.tenant, r), r)? {
            return Ok(Insert::Duplicate);
        }
        let device = self.device_id(&r.device)?;
        let series = self.series_id(device, r)?;
        self.rows_pending.push(Row {
            // Numbered at the commit, device by device (`flush_front`).
            id: 0,
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
                self.live_pending.push((0, kept));
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
            d.sent += 1;
            d.last_us = self.txn_us;
        }
        if let Some(st) = self.series.get_mut(&series) {
            st.readings += 1;
            st.last_us = self.txn_us;
        }
        Ok(Insert::Stored)
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
        self.fresh.committed();
        self.committed_live(!evictions.is_empty());
        Ok(evictions)
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

    /// The queue file's path.
    pub fn path(&self) -> &Path {
        &self.opts.path
    }
}
