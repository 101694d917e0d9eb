//! Devices and series: their rows and in-memory counts, the per-device series cap, idle
//! pruning, and the fair-share eviction of the oldest readings of the devices holding most.

use super::*;

/// Bytes of disk a `devices` row is accounted at: the row and its unique index entry.
pub(super) fn device_cost(name: &str) -> u64 {
    48 + 2 * name.len() as u64
}

/// Bytes of disk a `series` row is accounted at: the row and its unique index entry.
pub(super) fn series_cost(metric: &str, tags_len: usize) -> u64 {
    48 + 2 * (metric.len() + tags_len) as u64
}

impl Store {
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

    pub(super) fn device_id(&mut self, name: &str) -> Result<i64, StoreError> {
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
                sent: 0,
            },
        );
        Ok(id)
    }

    pub(super) fn series_id(&mut self, device: i64, r: &Reading) -> Result<i64, StoreError> {
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

    /// Counts one reading of `device` dropped by the rate limiter.
    pub fn count_rate_limited(&mut self, device: &str) -> Result<(), StoreError> {
        let id = self.device_id(device)?;
        *self.rate_limited.entry(id).or_default() += 1;
        if let Some(d) = self.devices.get_mut(&id) {
            d.sent += 1;
        }
        Ok(())
    }

    /// Each tracked device's id, name and readings sent (stored or rate-limited) while this
    /// process ran; the writer turns them into rates for the status page.
    pub fn device_counts(&self) -> impl Iterator<Item = (i64, &str, u64)> {
        self.devices
            .iter()
            .map(|(id, d)| (*id, d.name.as_str(), d.sent))
    }

    pub(super) fn evict_over_capacity(&mut self) -> Result<Vec<Eviction>, StoreError> {
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
            let series = self.evict_oldest(device, n)?;
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
}
