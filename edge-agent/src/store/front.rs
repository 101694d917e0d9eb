//! The write front and dedupe: a transaction's readings, identity hashes and MQTT message
//! records wait in memory, with their ids, and are written together at its commit, sorted,
//! several rows per statement. The duplicate check asks the open transaction's front, then
//! whether the reading is newer than anything remembered of its (device, metric) ([`fresh`]),
//! then the Bloom filters of both `seen` generations, and SQLite only when a filter says maybe.

use super::*;

/// Binds a multi-row statement's parameters one after another.
pub(super) struct Binder<'a, 'c> {
    st: &'a mut rusqlite::CachedStatement<'c>,
    next: usize,
}

impl Binder<'_, '_> {
    pub(super) fn bind(&mut self, v: impl rusqlite::ToSql) -> rusqlite::Result<()> {
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
pub(super) struct MultiInsert([String; CHUNKS.len()]);

impl MultiInsert {
    fn new(head: &str, columns: usize) -> Self {
        Self(CHUNKS.map(|n| multi_insert(head, columns, n)))
    }
}

/// The write front's statements.
#[derive(Debug)]
pub(super) struct FrontSql {
    seen: [MultiInsert; 2],
    mqtt: MultiInsert,
    pub(super) chunks: MultiInsert,
}

impl FrontSql {
    pub(super) fn new() -> Self {
        Self {
            seen: [0, 1]
                .map(|g| MultiInsert::new(&format!("INSERT OR IGNORE INTO seen{g} (ts, h)"), 2)),
            mqtt: MultiInsert::new("INSERT OR REPLACE INTO mqtt_msgs (id, pkid, hash)", 3),
            chunks: MultiInsert::new("INSERT INTO chunks (last, first, device, body)", 4),
        }
    }
}

impl Store {
    /// Puts every hash of generation `g` in its filter.
    pub(super) fn fill_bloom(&mut self, g: u8) -> Result<(), StoreError> {
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
    pub(super) fn first_sighting(&mut self, h: i64, r: &Reading) -> Result<bool, StoreError> {
        let key = fresh::key(&r.device, &r.metric);
        let id = (r.ts.0, h);
        if self.fresh.certainly_new(key, r.ts.0)
            || (!self.seen_front.contains(&id)
                && !self.blooms[0].maybe(h)
                && !self.blooms[1].maybe(h))
        {
            self.remember(id, key);
            return Ok(true);
        }
        if self.seen_front.contains(&id) {
            return Ok(false);
        }
        let seen = self
            .conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM seen0 WHERE ts IN (?1, ?2) AND h = ?3)
                     OR EXISTS (SELECT 1 FROM seen1 WHERE ts IN (?1, ?2) AND h = ?3)",
            )
            .and_then(|mut s| s.query_row([r.ts.0, TS_UNKNOWN, h], |r| r.get::<_, bool>(0)))
            .map_err(self.sql_err("checking for duplicates"))?;
        if seen {
            return Ok(false);
        }
        self.remember(id, key);
        Ok(true)
    }

    /// Records a fresh identity in the write front, the current generation's filter and
    /// the freshness bounds.
    fn remember(&mut self, (ts, h): (i64, i64), key: u64) {
        self.seen_front.insert((ts, h));
        self.blooms[self.seen_current as usize].add(h);
        self.fresh.remember(self.seen_current, key, ts);
    }

    /// Writes the open transaction's front: its identities, sorted (by time first, so they
    /// land at the end of the generation's tree, on few pages), and its readings, numbered
    /// device by device and written as chunks, several rows per statement.
    pub(super) fn flush_front(&mut self) -> Result<(), StoreError> {
        let mut hashes: Vec<(i64, i64)> = self.seen_front.drain().collect();
        hashes.sort_unstable();
        let g = self.seen_current;
        if let Some(newest) = self.fresh.to_write(g) {
            self.conn
                .prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")
                .and_then(|mut s| s.execute(params![format!("seen{g}_ts_max"), newest]))
                .map_err(self.sql_err("recording the newest reading remembered"))?;
        }
        let sql = &self.front_sql;
        self.insert_rows(
            &sql.seen[self.seen_current as usize],
            "recording identities",
            &hashes,
            |b, (ts, h)| {
                b.bind(ts)?;
                b.bind(h)
            },
        )?;
        // In order: a repeat replaces the record before it, as it would one by one.
        let msgs = std::mem::take(&mut self.mqtt_pending);
        self.insert_rows(&sql.mqtt, "recording MQTT messages", &msgs, |b, m| {
            b.bind(m.0)?;
            b.bind(m.1)?;
            b.bind(m.2)
        })?;
        let rows = self.number_pending();
        self.write_chunks(&rows)
    }

    /// Gives the open transaction's readings their ids, device by device (a stable sort:
    /// each device's keep their order), and puts the live lane's copies in the same order.
    /// Returns the rows in id order.
    fn number_pending(&mut self) -> Vec<Row> {
        let mut rows = std::mem::take(&mut self.rows_pending);
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| rows[i].device);
        let base = self.next_id;
        for (k, &i) in order.iter().enumerate() {
            rows[i].id = base + k as i64;
        }
        let live = std::mem::take(&mut self.live_pending);
        if !live.is_empty() {
            debug_assert_eq!(live.len(), rows.len(), "live copies of some readings only");
            let mut slots: Vec<Option<Reading>> = live.into_iter().map(|(_, r)| Some(r)).collect();
            self.live_pending = order
                .iter()
                .map(|&i| (rows[i].id, slots[i].take().expect("each reading once")))
                .collect();
        }
        rows.sort_unstable_by_key(|r| r.id);
        if !rows.is_empty() {
            self.next_id = base + rows.len() as i64;
            self.last_id = self.next_id - 1;
        }
        rows
    }

    /// Inserts `items` with `sql`, as many rows per statement as [`CHUNKS`] allows; `bind`
    /// binds one item's columns in order.
    pub(super) fn insert_rows<T>(
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
}
