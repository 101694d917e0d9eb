//! The store's side of the uplink lanes ([`super::lanes`] decides which ids): batches read
//! from the live lane's memory or from SQLite, deleted by id range on the cloud's ack, split
//! or quarantined when it refuses them.

use super::*;

impl Store {
    /// The open transaction committed: its readings join the live lane's memory, unless it
    /// evicted (rows the memory holds may be gone) or the memory is full.
    pub(super) fn committed_live(&mut self, evicted: bool) {
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

    /// Forgets batches in flight and makes everything stored so far backlog: called when a
    /// connection to the cloud (re)starts, after which unacked readings are sent again.
    pub fn restart_lanes(&mut self) {
        debug_assert!(!self.in_txn, "lanes restarted inside a transaction");
        self.lanes.restart(self.last_id);
        self.live_mem.clear();
        self.live_mem.shrink_to(self.opts.live_buffer.min(1024));
        self.live_complete = true;
    }

    /// Live readings not yet read into a batch (an upper bound when some were evicted).
    pub fn live_waiting(&self) -> u64 {
        self.lanes.live_waiting(self.last_id)
    }

    /// Whether backlog readings are waiting to be read.
    pub fn has_backlog(&self) -> bool {
        self.lanes.backlog_waiting() && self.total > 0
    }

    /// Reads up to `max` readings of `lane`, oldest first, and puts them in flight.
    pub fn read_batch(
        &mut self,
        lane: Lane,
        max: usize,
    ) -> Result<Option<QueuedBatch>, StoreError> {
        assert!(!self.in_txn, "read_batch inside a write transaction");
        if max == 0 {
            return Ok(None);
        }
        let batch = |id, rows: Vec<(i64, Reading)>| QueuedBatch {
            id,
            lane,
            readings: rows.into_iter().map(|(_, r)| r).collect(),
        };
        loop {
            match self.lanes.next(lane) {
                lanes::Next::Nothing => return Ok(None),
                lanes::Next::Retry(part) => {
                    let rows = self.read_range(part.first - 1, part.last, max)?;
                    let Some(&(last, _)) = rows.last() else {
                        continue; // evicted meanwhile
                    };
                    let id = self.lanes.sent_retry(part, last, rows.len());
                    return Ok(Some(batch(id, rows)));
                }
                lanes::Next::Range { after, upto } => {
                    let rows = match lane {
                        Lane::Live => self.read_live(max)?,
                        Lane::Backlog => self.read_range(after, upto, max)?,
                    };
                    let Some(&(last, _)) = rows.last() else {
                        // Nothing left in this lane up to its end: skip the empty stretch.
                        self.lanes.exhausted(lane);
                        return Ok(None);
                    };
                    let id = self.lanes.sent(lane, after, last, rows.len());
                    return Ok(Some(batch(id, rows)));
                }
            }
        }
    }

    /// Up to `max` live readings past the cursor: from memory while it has them, else from
    /// SQLite; a read from SQLite that reaches the newest reading lets commits fill the
    /// memory again.
    pub(super) fn read_live(&mut self, max: usize) -> Result<Vec<(i64, Reading)>, StoreError> {
        if !self.live_mem.is_empty() {
            let n = max.min(self.live_mem.len());
            let rows: Vec<(i64, Reading)> = self.live_mem.drain(..n).collect();
            debug_assert!(rows[0].0 > self.lanes.live_cursor());
            return Ok(rows);
        }
        if self.live_complete {
            return Ok(Vec::new());
        }
        let rows = self.read_range(self.lanes.live_cursor(), i64::MAX, max)?;
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

    pub(super) fn read_range(
        &self,
        after: i64,
        upto: i64,
        max: usize,
    ) -> Result<Vec<(i64, Reading)>, StoreError> {
        let rows = self.read_entries(after, upto, max)?;
        let mut out = Vec::new();
        for (
            id,
            _,
            chunks::Entry {
                series,
                ts,
                bits,
                seq,
            },
        ) in rows
        {
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
        let Some(f) = self.lanes.take(batch) else {
            return Ok(0);
        };
        // One transaction: a row at the range's edge is deleted and put back with the
        // readings that stay, and a crash between the two must not lose them.
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(self.sql_err("deleting an acked batch"))?;
        let gone = self.delete_range(f.first, f.last)?;
        tx.commit()
            .map_err(self.sql_err("deleting an acked batch"))?;
        for &(device, series) in &gone {
            self.forget_one(device, series);
        }
        Ok(gone.len() as u64)
    }

    /// One reading of `device` in `series` left the queue.
    pub(super) fn forget_one(&mut self, device: i64, series: i64) {
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
        let Some(f) = self.lanes.take(batch) else {
            return Ok(Refused::Unknown);
        };
        let ids = self.ids_in(f.first, f.last)?;
        match self.lanes.refused(f, &ids) {
            lanes::Refusal::Gone => Ok(Refused::Unknown),
            lanes::Refusal::Again => Ok(Refused::Again),
            lanes::Refusal::Quarantine(id) => {
                let rows = self.read_range(id - 1, id, 1)?;
                let (id, r) = rows.into_iter().next().expect("the row just found");
                self.quarantine(id, &r, reason, detail, now_us)?;
                Ok(Refused::Quarantined(Box::new(r)))
            }
            lanes::Refusal::Split { first, second } => Ok(Refused::Split { first, second }),
        }
    }

    pub(super) fn quarantine(
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
        let gone = self.delete_range(id, id)?;
        let keep = self.opts.dead_letters_keep as i64;
        if qid > keep {
            tx.prepare_cached("DELETE FROM quarantine WHERE id <= ?1")
                .and_then(|mut s| s.execute([qid - keep]))
                .map_err(self.sql_err("trimming the quarantine"))?;
        }
        tx.commit()
            .map_err(self.sql_err("quarantining a reading"))?;
        for (device, series) in gone {
            self.forget_one(device, series);
        }
        Ok(())
    }

    /// Batches in flight.
    pub fn in_flight(&self) -> usize {
        self.lanes.in_flight()
    }

    /// The timestamp of the oldest queued reading, if any.
    pub fn oldest_ts(&self) -> Result<Option<i64>, StoreError> {
        chunks::oldest_ts(&self.conn).map_err(self.sql_err("finding the oldest reading"))
    }
}
