//! Read-only views of a queue file, for `edge-agent queue ...` while the agent runs (WAL
//! lets readers work beside the writer).

use rusqlite::Connection;
use serde::Serialize;

use super::ROW_COST;

/// What `edge-agent queue stats` prints.
#[derive(Debug, Clone, Serialize)]
pub struct QueueStats {
    /// Readings waiting for the cloud.
    pub readings: u64,
    /// Bytes accounted against `store.max_bytes`: `readings` x the per-reading cost, plus
    /// the device and series rows.
    pub bytes: u64,
    /// The file's size on disk, WAL excluded.
    pub file_bytes: u64,
    /// Devices with readings waiting.
    pub devices: u64,
    /// Dead letters kept.
    pub dead_letters: u64,
    /// Readings in quarantine (refused by the cloud on their own).
    pub quarantined: u64,
    /// Timestamp (µs since the epoch) of the oldest waiting reading.
    pub oldest_ts: Option<i64>,
    /// Readings evicted over the queue's life.
    pub evicted: u64,
    /// The payload schema set in force (pushed from the cloud's registry): its version, 0
    /// when none was received.
    pub schema_set_version: u64,
    /// How many schemas the set holds.
    pub schemas: usize,
    /// Dead letters marked for replay and not replayed yet.
    pub replay_pending: u64,
    /// Per-device figures, most readings first (devices pruned when idle are gone from
    /// here, and their evictions counted in `evicted` only).
    pub per_device: Vec<DeviceStats>,
}

/// One device's line in [`QueueStats`].
#[derive(Debug, Clone, Serialize)]
pub struct DeviceStats {
    /// The device id.
    pub device: String,
    /// Readings waiting.
    pub readings: u64,
    /// Readings evicted over the queue's life.
    pub evicted: u64,
    /// Readings dropped by the rate limiter over the queue's life.
    pub rate_limited: u64,
}

/// One dead letter.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// Its id.
    pub id: i64,
    /// When it arrived, µs since the epoch.
    pub received_us: i64,
    /// `mqtt` or `coap`.
    pub source: String,
    /// The topic, or the CoAP peer and path.
    pub origin: String,
    /// The reason label.
    pub reason: String,
    /// What exactly was wrong.
    pub detail: String,
    /// The payload's full size.
    pub size: u64,
    /// The payload's first bytes.
    #[serde(skip)]
    pub payload: Vec<u8>,
}

/// Opens a queue file for reading only.
pub fn open_read_only(path: &std::path::Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

/// One queued reading as [`queued_readings`] lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedReading {
    /// The device's name.
    pub device: String,
    /// The metric.
    pub metric: String,
    /// The reading's time (µs since the epoch).
    pub ts: i64,
    /// The value.
    pub value: f64,
    /// The device's sequence number, if it sent one.
    pub seq: Option<u64>,
}

/// Every reading queued behind `conn`, in id order (the order the uplink ships them).
pub fn queued_readings(conn: &Connection) -> rusqlite::Result<Vec<QueuedReading>> {
    let tx = conn.unchecked_transaction()?; // one consistent snapshot
    let names: std::collections::HashMap<i64, String> = tx
        .prepare("SELECT id, name FROM devices")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let metrics: std::collections::HashMap<i64, String> = tx
        .prepare("SELECT id, metric FROM series")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut st = tx.prepare("SELECT first, last, device, body FROM chunks ORDER BY last")?;
    let mut rows = st.query([])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let (first, last, device, body): (i64, i64, i64, Vec<u8>) =
            (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?);
        let entries = super::chunks::decode_row(first, last, &body).ok_or_else(|| {
            rusqlite::Error::InvalidColumnType(
                3,
                format!("chunk {first}..={last}"),
                rusqlite::types::Type::Blob,
            )
        })?;
        for e in entries {
            out.push(QueuedReading {
                device: names.get(&device).cloned().unwrap_or_default(),
                metric: metrics.get(&e.series).cloned().unwrap_or_default(),
                ts: e.ts,
                value: f64::from_bits(e.bits as u64),
                seq: e.seq.map(|s| s as u64),
            });
        }
    }
    Ok(out)
}

/// Figures of the queue behind `conn`.
pub fn stats(conn: &Connection) -> rusqlite::Result<QueueStats> {
    let tx = conn.unchecked_transaction()?; // one consistent snapshot
    let mut stmt = tx.prepare(
        "SELECT d.name, coalesce(r.n, 0), d.evicted, d.rate_limited FROM devices d
         LEFT JOIN (SELECT device, sum(last - first + 1) AS n FROM chunks GROUP BY device) r
           ON r.device = d.id
         ORDER BY 2 DESC, 1",
    )?;
    let per_device: Vec<DeviceStats> = stmt
        .query_map([], |r| {
            Ok(DeviceStats {
                device: r.get(0)?,
                readings: r.get::<_, i64>(1)? as u64,
                evicted: r.get::<_, i64>(2)? as u64,
                rate_limited: r.get::<_, i64>(3)? as u64,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    drop(stmt);
    let readings: u64 = per_device.iter().map(|d| d.readings).sum();
    let dead_letters: i64 = tx.query_row("SELECT count(*) FROM dead_letters", [], |r| r.get(0))?;
    let quarantined: i64 = if has_quarantine(&tx)? {
        tx.query_row("SELECT count(*) FROM quarantine", [], |r| r.get(0))?
    } else {
        0
    };
    let oldest_ts = super::chunks::oldest_ts(&tx)?;
    // Counts of devices pruned when idle.
    let pruned_evicted: i64 = tx.query_row(
        "SELECT coalesce(max(value), 0) FROM meta WHERE key = 'pruned_evicted'",
        [],
        |r| r.get(0),
    )?;
    // Device and series rows, at the cost the writer accounts them (see `Store::bytes`).
    let state: i64 = tx.query_row(
        "SELECT (SELECT coalesce(sum(48 + 2 * length(CAST(name AS BLOB))), 0) FROM devices)
              + (SELECT coalesce(sum(48 + 2 * (length(CAST(metric AS BLOB)) + length(CAST(tags AS BLOB)))), 0) FROM series)",
        [],
        |r| r.get(0),
    )?;
    let pages: i64 = tx.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let page_size: i64 = tx.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let (schema_set_version, schemas) =
        super::schema_set(&tx)?.map_or((0, 0), |(v, s)| (v, s.len()));
    let replay_pending: i64 = if has_table(&tx, "replay_requests")? {
        tx.query_row("SELECT count(*) FROM replay_requests", [], |r| r.get(0))?
    } else {
        0
    };
    Ok(QueueStats {
        schema_set_version,
        schemas,
        replay_pending: replay_pending as u64,
        readings,
        bytes: readings * ROW_COST + state as u64,
        file_bytes: (pages * page_size) as u64,
        devices: per_device.iter().filter(|d| d.readings > 0).count() as u64,
        dead_letters: dead_letters as u64,
        quarantined: quarantined as u64,
        oldest_ts,
        evicted: per_device.iter().map(|d| d.evicted).sum::<u64>() + pruned_evicted as u64,
        per_device,
    })
}

/// The newest `limit` dead letters, newest first.
pub fn dead_letters(conn: &Connection, limit: u64) -> rusqlite::Result<Vec<DeadLetter>> {
    let mut stmt = conn.prepare(
        "SELECT id, received_us, source, origin, reason, detail, size, payload
         FROM dead_letters ORDER BY id DESC LIMIT ?1",
    )?;
    stmt.query_map([limit as i64], dead_letter_row)?.collect()
}

/// How many dead letters the file keeps, by reason, most first.
pub fn dead_letter_reasons(conn: &Connection) -> rusqlite::Result<Vec<(String, u64)>> {
    let mut stmt = conn
        .prepare("SELECT reason, count(*) FROM dead_letters GROUP BY reason ORDER BY 2 DESC, 1")?;
    stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
        .collect()
}

/// A dead letter from a row of `id, received_us, source, origin, reason, detail, size,
/// payload`.
pub(super) fn dead_letter_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetter> {
    Ok(DeadLetter {
        id: r.get(0)?,
        received_us: r.get(1)?,
        source: r.get(2)?,
        origin: r.get(3)?,
        reason: r.get(4)?,
        detail: r.get(5)?,
        size: r.get::<_, i64>(6)? as u64,
        payload: r.get(7)?,
    })
}

/// One reading in quarantine: the cloud refused it on its own, so it is kept here instead of
/// being sent again forever.
#[derive(Debug, Clone, Serialize)]
pub struct Quarantined {
    /// Its id.
    pub id: i64,
    /// When it was quarantined, µs since the epoch.
    pub at_us: i64,
    /// The cloud's refusal code, as a label (`malformed`, `too_large`).
    pub reason: String,
    /// The cloud's words.
    pub detail: String,
    /// The device id.
    pub device: String,
    /// The metric.
    pub metric: String,
    /// The tags, as canonical JSON (empty if none).
    pub tags: String,
    /// The reading's time, µs since the epoch.
    pub ts: i64,
    /// Its value (`None` for NaN, which SQLite stores as NULL).
    pub value: Option<f64>,
}

// A queue file written by an agent older than the quarantine has no such table.
fn has_quarantine(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'quarantine'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
}

/// The newest `limit` quarantined readings, newest first.
pub fn quarantined(conn: &Connection, limit: u64) -> rusqlite::Result<Vec<Quarantined>> {
    if !has_quarantine(conn)? {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare(
        "SELECT id, at_us, reason, detail, device, metric, tags, ts, value
         FROM quarantine ORDER BY id DESC LIMIT ?1",
    )?;
    stmt.query_map([limit as i64], |r| {
        Ok(Quarantined {
            id: r.get(0)?,
            at_us: r.get(1)?,
            reason: r.get(2)?,
            detail: r.get(3)?,
            device: r.get(4)?,
            metric: r.get(5)?,
            tags: r.get(6)?,
            ts: r.get(7)?,
            value: r.get(8)?,
        })
    })?
    .collect()
}

fn has_table(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [name],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
}
